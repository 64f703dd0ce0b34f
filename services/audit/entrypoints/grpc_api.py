"""gRPC servicer of the audit service."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import asyncpg
import grpc

from crm.v1 import audit_pb2, audit_pb2_grpc, common_pb2
from services.audit.service_layer.queries import AuditLogQuery, list_audit_logs
from shared import protoconv
from shared.events import OPERATION_NAMES, OPERATIONS


def _json_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def audit_log_message(row: dict[str, Any]) -> audit_pb2.AuditLog:
    return audit_pb2.AuditLog(
        id=str(row["id"]),
        tenant_id=str(row["tenant_id"]),
        table_name=row["table_name"],
        record_id=str(row["record_id"]),
        operation=OPERATIONS[row["operation"]],
        old_values_json=_json_text(row["old_values"]),
        new_values_json=_json_text(row["new_values"]),
        changed_fields=list(row["changed_fields"] or []),
        actor=common_pb2.Actor(
            user_id=str(row["user_id"] or ""),
            email=row["user_email"] or "",
            session_id=row["session_id"] or "",
            ip_address=str(row["ip_address"] or ""),
            user_agent=row["user_agent"] or "",
        ),
        request_id=row["request_id"] or "",
        api_endpoint=row["api_endpoint"] or "",
        change_time=protoconv.timestamp(row["changed_at"]),
        service=row["service"],
        record_version=row["record_version"],
        event_id=str(row["event_id"]),
    )


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, pool: Callable[[], asyncpg.Pool]) -> None:
        self._pool = pool

    async def ListAuditLogs(
        self, request: audit_pb2.ListAuditLogsRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListAuditLogsResponse:
        rows, next_token = await list_audit_logs(
            self._pool(),
            AuditLogQuery(
                page_size=request.page_size,
                page_token=request.page_token,
                table_name=request.table_name,
                record_id=request.record_id,
                user_id=request.user_id,
                operation=OPERATION_NAMES.get(request.operation, ""),
                start_time=protoconv.from_timestamp(request.start_time)
                if request.HasField("start_time")
                else None,
                end_time=protoconv.from_timestamp(request.end_time) if request.HasField("end_time") else None,
            ),
        )
        return audit_pb2.ListAuditLogsResponse(
            audit_logs=[audit_log_message(row) for row in rows], next_page_token=next_token
        )
