"""NATS JetStream plumbing shared by publishers and consumers: the stream, its subjects, and the
change events every service publishes through its outbox."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import nats
from google.protobuf import timestamp_pb2
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from crm.v1 import common_pb2, events_pb2
from shared.context import current_call

STREAM_NAME = "CRM_EVENTS"
STREAM_SUBJECTS = ["crm.events.>", "crm.control.>", "crm.auth.>", "crm.api.>", "crm.deadletter.>"]

OPERATIONS = {
    "INSERT": common_pb2.OPERATION_INSERT,
    "UPDATE": common_pb2.OPERATION_UPDATE,
    "DELETE": common_pb2.OPERATION_DELETE,
    "RESTORE": common_pb2.OPERATION_RESTORE,
}
OPERATION_NAMES = {value: key for key, value in OPERATIONS.items()}

# Columns that hold secrets or their hashes: they never leave the owning service.
SECRET_COLUMNS = frozenset(
    {"password_hash", "key_hash", "salt", "token_hash", "secret_hash", "encrypted_value"}
)


def change_subject(tenant_id: str, service: str, table: str, operation: str) -> str:
    return f"crm.events.{tenant_id}.{service}.{table}.{operation}"


def control_subject(kind: int) -> str:
    name = events_pb2.ControlEventKind.Name(kind).removeprefix("CONTROL_EVENT_KIND_").lower()  # type: ignore[arg-type]
    return f"crm.control.{name}"


async def connect(url: str, name: str) -> NatsClient:
    """Connects with unlimited reconnects, so a broker restart only delays publishing."""
    return await nats.connect(
        servers=[u.strip() for u in url.split(",")],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
    )


async def ensure_stream(js: JetStreamContext, replicas: int = 1) -> None:
    config = StreamConfig(
        name=STREAM_NAME,
        subjects=STREAM_SUBJECTS,
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=7 * 24 * 3600,
        duplicate_window=300,  # seconds; the relay's re-publish after a crash lands inside it
        num_replicas=replicas,
    )
    try:
        await js.stream_info(STREAM_NAME)
        await js.update_stream(config)
    except NotFoundError:
        await js.add_stream(config)


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def to_json(values: Mapping[str, Any] | None) -> str:
    if values is None:
        return ""
    public = {k: v for k, v in values.items() if k not in SECRET_COLUMNS}
    return json.dumps(public, default=_json_default, sort_keys=True, separators=(",", ":"))


def changed_fields(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> list[str]:
    """Fields whose values differ, compared by value over the union of keys (not by key set)."""
    old = old or {}
    new = new or {}
    return sorted(
        key
        for key in set(old) | set(new)
        if key not in SECRET_COLUMNS
        and json.dumps(old.get(key), default=_json_default, sort_keys=True)
        != json.dumps(new.get(key), default=_json_default, sort_keys=True)
    )


def timestamp_now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def build_change_event(
    *,
    tenant_id: str,
    service: str,
    table: str,
    record_id: str,
    operation: str,
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any] | None,
    version: int,
    extra_changed: Iterable[str] = (),
) -> events_pb2.ChangeEvent:
    """The change event for one committed change, with the current caller as actor."""
    call = current_call()
    fields = changed_fields(old, new) if operation in ("UPDATE", "RESTORE") else []
    return events_pb2.ChangeEvent(
        event_id=str(uuid.uuid4()),
        tenant_id=tenant_id,
        service=service,
        table_name=table,
        record_id=record_id,
        operation=OPERATIONS[operation],
        old_values_json=to_json(old),
        new_values_json=to_json(new),
        changed_fields=sorted({*fields, *extra_changed}),
        record_version=version,
        actor=common_pb2.Actor(
            user_id=call.user_id or "",
            email=call.email or "",
            session_id=call.session_id or "",
            ip_address=call.ip_address or "",
            user_agent=call.user_agent or "",
            api_key_id=call.api_key_id or "",
        ),
        request_id=call.request_id,
        api_endpoint=call.method,
        occur_time=timestamp_now(),
    )
