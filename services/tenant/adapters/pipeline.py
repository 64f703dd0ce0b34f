"""Onboarding's step on the tenant's shard: the default "Sales Pipeline" in the core-entity
service. Behind an interface, because the pipeline contract (core_entity.proto) belongs to
another service and may not be compiled into this build."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from shared.context import REQUEST_ID_KEY, SHARD_EPOCH_KEY, TENANT_ID_KEY
from shared.grpc_server import insecure_channel, internal_metadata

# The seed's default stages: name, probability (percent), closed, won.
DEFAULT_PIPELINE_NAME = "Sales Pipeline"
DEFAULT_STAGES: tuple[tuple[str, int, bool, bool], ...] = (
    ("Prospecting", 10, False, False),
    ("Qualification", 25, False, False),
    ("Proposal", 50, False, False),
    ("Negotiation", 75, False, False),
    ("Closed Won", 100, True, True),
    ("Closed Lost", 0, True, False),
)


@dataclass(frozen=True, slots=True)
class PipelineTarget:
    tenant_id: str
    core_entity_address: str
    epoch: int
    # Derived from the onboarding request id, so a resumed onboarding sends the same key and
    # the core-entity service can answer a repeat with the pipeline it already made.
    request_id: str


class PipelineProvisioner(Protocol):
    async def create_default_pipeline(self, target: PipelineTarget) -> str:
        """Creates the default pipeline with its six stages; returns its id."""
        ...


class NoPipelineService:
    """Used while the core-entity pipeline contract is not available: onboarding skips the
    step and reports no default pipeline id."""

    async def create_default_pipeline(self, target: PipelineTarget) -> str:
        return ""


def pipeline_request_id(create_request_id: uuid.UUID | None, tenant_id: str) -> str:
    base = create_request_id or uuid.UUID(tenant_id)
    return str(uuid.uuid5(base, "default-sales-pipeline"))


class GrpcPipelineProvisioner:
    """Calls PipelineService on the tenant's shard as an internal call (internal token, tenant
    and request id in metadata). Before creating it looks for an existing default "Sales
    Pipeline", so a resumed onboarding reuses the one a failed attempt already made."""

    def __init__(self, internal_token: str, timeout: float) -> None:
        self._internal_token = internal_token
        self._timeout = timeout
        self._channels: dict[str, Any] = {}

    def _stub(self, address: str) -> Any:
        from crm.v1 import core_entity_pb2_grpc

        channel = self._channels.get(address)
        if channel is None:
            channel = insecure_channel(address)
            self._channels[address] = channel
        return core_entity_pb2_grpc.PipelineServiceStub(channel)

    async def create_default_pipeline(self, target: PipelineTarget) -> str:
        from crm.v1 import core_entity_pb2

        stub = self._stub(target.core_entity_address)
        metadata = internal_metadata(
            self._internal_token,
            (
                (TENANT_ID_KEY, target.tenant_id),
                (REQUEST_ID_KEY, target.request_id),
                (SHARD_EPOCH_KEY, str(target.epoch)),
            ),
        )
        existing = await stub.ListPipelines(
            core_entity_pb2.ListPipelinesRequest(page_size=100), metadata=metadata, timeout=self._timeout
        )
        for pipeline in existing.pipelines:
            if pipeline.name == DEFAULT_PIPELINE_NAME and pipeline.is_default:
                return str(pipeline.id)
        created = await stub.CreatePipeline(
            core_entity_pb2.CreatePipelineRequest(
                pipeline=core_entity_pb2.Pipeline(
                    name=DEFAULT_PIPELINE_NAME,
                    description="Default sales pipeline",
                    is_default=True,
                    is_active=True,
                    stages=[
                        core_entity_pb2.PipelineStage(
                            name=name,
                            stage_order=order,
                            probability=str(probability),
                            is_closed=closed,
                            is_won=won,
                        )
                        for order, (name, probability, closed, won) in enumerate(DEFAULT_STAGES, start=1)
                    ],
                )
            ),
            metadata=metadata,
            timeout=self._timeout,
        )
        return str(created.id)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
