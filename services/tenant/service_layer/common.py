"""Helpers every tenant-service use case shares: caller checks, id and etag parsing, paging,
and the control and auth events that go out through the outbox."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from crm.v1 import events_pb2
from services.tenant import SCHEMA
from services.tenant.adapters.tables import api_keys, users
from shared.context import current_call
from shared.errors import Aborted, InvalidArgument, PermissionDenied, Unauthenticated, invalid
from shared.events import control_subject, timestamp_now
from shared.outbox import add_to_outbox


def row_dict(mapping: Mapping[str, Any] | Any) -> dict[str, Any]:
    return {key: (str(value) if isinstance(value, uuid.UUID) else value) for key, value in mapping.items()}


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def parse_uuid(value: str, field: str) -> uuid.UUID:
    if not value:
        raise invalid(field, "is required")
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise invalid(field, "must be a UUID") from exc


def check_etag(etag: str, version: int, what: str) -> None:
    """An empty etag skips the check; a stale one is ABORTED (AIP-154)."""
    if etag and etag != f'W/"{version}"':
        raise Aborted(
            f"the {what} changed since it was read (etag {etag}); read it again", reason="STALE_ETAG"
        )


def check_mask(paths: list[str], allowed: tuple[str, ...], field: str = "update_mask") -> list[str]:
    if not paths:
        raise invalid(field, f"must name at least one of {', '.join(allowed)}")
    unknown = [path for path in paths if path not in allowed]
    if unknown:
        raise invalid(field, f"cannot change {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return paths


def require_platform_admin() -> None:
    if not current_call().platform_admin:
        raise PermissionDenied("this call needs the platform admin credential")


def caller_tenant() -> str:
    """The tenant of the calling credential; platform calls carry none."""
    tenant_id = current_call().tenant_id
    if not tenant_id:
        raise PermissionDenied("this call needs a tenant credential")
    return tenant_id


async def require_tenant_admin(session: AsyncSession) -> None:
    """The caller must be an admin user; with an API key, the key must carry the admin scope too."""
    call = current_call()
    if not call.user_id:
        raise PermissionDenied("this call needs a user's credential")
    role = await session.scalar(
        select(users.c.role).where(users.c.id == uuid.UUID(call.user_id), users.c.is_active)
    )
    if role is None:
        raise Unauthenticated("the calling user no longer exists or is inactive")
    if role != "admin":
        raise PermissionDenied("this call needs an admin user", reason="ADMIN_ROLE_REQUIRED")
    if call.api_key_id:
        scopes = await session.scalar(
            select(api_keys.c.scopes).where(api_keys.c.id == uuid.UUID(call.api_key_id))
        )
        if scopes is None or "admin" not in scopes:
            raise PermissionDenied(
                "this call needs an API key with the admin scope", reason="ADMIN_SCOPE_REQUIRED"
            )


async def publish_control(
    session: AsyncSession,
    kind: int,
    tenant_id: str,
    *,
    shard_id: str = "",
    epoch: int = 0,
    resource_id: str = "",
) -> None:
    event = events_pb2.ControlEvent(
        event_id=str(uuid.uuid4()),
        kind=kind,  # type: ignore[arg-type]
        tenant_id=tenant_id,
        shard_id=shard_id,
        epoch=epoch,
        resource_id=resource_id,
        occur_time=timestamp_now(),
    )
    await add_to_outbox(session, SCHEMA, control_subject(kind), event.event_id, event)


async def publish_auth_event(
    session: AsyncSession,
    *,
    event_type: str,
    tenant_id: str = "",
    user_id: str = "",
    email: str = "",
    success: bool = False,
    failure_reason: str = "",
    session_id: str = "",
) -> None:
    """An auth event for the audit service; never carries a password or a token."""
    call = current_call()
    event = events_pb2.AuthEvent(
        event_id=str(uuid.uuid4()),
        tenant_id=tenant_id,
        user_id=user_id,
        email=email,
        event_type=event_type,
        success=success,
        failure_reason=failure_reason,
        ip_address=call.ip_address or "",
        user_agent=call.user_agent or "",
        session_id=session_id,
        occur_time=timestamp_now(),
    )
    subject = f"crm.auth.{tenant_id or 'unknown'}.{event_type}"
    await add_to_outbox(session, SCHEMA, subject, event.event_id, event)


def violations_or_none(violations: list[Any]) -> None:
    if violations:
        raise InvalidArgument(violations)
