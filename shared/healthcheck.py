"""`python -m shared.healthcheck [host:port]`: exits 0 when the gRPC server reports SERVING.

Container images use it as their HEALTHCHECK, so they need no extra probe binary.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, timeout: float = 2.0) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def main() -> int:
    target = sys.argv[1] if len(sys.argv) > 1 else f"127.0.0.1:{os.environ.get('CRM_PORT', '50051')}"
    return 0 if check(target) else 1


if __name__ == "__main__":
    sys.exit(main())
