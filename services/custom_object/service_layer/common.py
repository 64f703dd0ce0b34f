"""What every use case of the service shares: the caller's tenant, loading definitions as
`FieldDefinition`s, events for definition changes, and etag checks."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from crm.v1 import events_pb2
from services.custom_object import SCHEMA, SERVICE
from services.custom_object.adapters.tables import custom_field_options, custom_fields, custom_objects
from services.custom_object.domain.rules import parse_etag
from shared.context import current_call
from shared.db import UnitOfWork, fetch_rows
from shared.errors import Aborted, FailedPrecondition, NotFound, PermissionDenied, invalid
from shared.events import control_subject, timestamp_now
from shared.fieldtypes import CORE_OBJECT_TYPES, FieldDefinition, PicklistOption
from shared.outbox import add_to_outbox, record_change

#: Checks, inside a transaction, that this shard serves the tenant (shared.shard_guard.MembershipGuard).
Guard = Callable[[AsyncSession, str, bool], Awaitable[None]]


class GuardedUnitOfWork(UnitOfWork):
    """A unit of work that first asks the shard guard whether this shard serves the tenant."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], tenant: str, guard: Guard | None, is_write: bool
    ) -> None:
        super().__init__(sessions, tenant)
        self._guard = guard
        self._is_write = is_write

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        if self._guard is not None:
            try:
                await self._guard(self.session, self.tenant_id or "", self._is_write)
            except BaseException:
                await super().__aexit__(None, None, None)
                raise
        return self


def tenant_id() -> str:
    """The caller's tenant; a call without one (no gateway context) sees nothing."""
    tenant = current_call().tenant_id
    if not tenant:
        raise PermissionDenied("this call needs a tenant context")
    return tenant


def actor_id() -> uuid.UUID | None:
    user = current_call().user_id
    try:
        return uuid.UUID(user) if user else None
    except ValueError:
        return None


def parse_id(value: str, path: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError) as exc:
        raise invalid(path, "must be a UUID") from exc


def as_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return None


def check_etag(etag: str, current_version: int, path: str = "etag") -> None:
    try:
        expected = parse_etag(etag)
    except ValueError as exc:
        raise invalid(path, str(exc)) from exc
    if expected is not None and expected != current_version:
        raise Aborted(f"the resource changed since it was read (etag {etag}); read it again and retry")


def row_dict(row: Mapping[str, Any] | Any) -> dict[str, Any]:
    return dict(row._mapping if hasattr(row, "_mapping") else row)


@dataclass
class ObjectType:
    """A resolved object type: a core entity type, or a custom object and its row."""

    api_name: str
    custom_object: dict[str, Any] | None = None

    @property
    def is_core(self) -> bool:
        return self.custom_object is None

    @property
    def object_id(self) -> uuid.UUID | None:
        return self.custom_object["id"] if self.custom_object is not None else None


async def find_custom_object(session: AsyncSession, tenant: str, key: str) -> dict[str, Any] | None:
    """A custom object by id or api_name."""
    condition = (
        custom_objects.c.id == as_uuid(key) if as_uuid(key) is not None else custom_objects.c.api_name == key
    )
    rows = await fetch_rows(
        session, select(custom_objects).where(custom_objects.c.tenant_id == uuid.UUID(tenant), condition)
    )
    return rows[0] if rows else None


async def get_custom_object(
    session: AsyncSession, tenant: str, key: str, *, for_update: bool = False
) -> dict[str, Any]:
    if for_update:
        condition = (
            custom_objects.c.id == as_uuid(key)
            if as_uuid(key) is not None
            else custom_objects.c.api_name == key
        )
        row = (
            await session.execute(
                select(custom_objects)
                .where(custom_objects.c.tenant_id == uuid.UUID(tenant), condition)
                .with_for_update()
            )
        ).first()
        found = row_dict(row) if row is not None else None
    else:
        found = await find_custom_object(session, tenant, key)
    if found is None:
        raise NotFound(f"no custom object {key[:100]!r}")
    return found


async def resolve_object_type(session: AsyncSession, tenant: str, api_name: str, path: str) -> ObjectType:
    if api_name in CORE_OBJECT_TYPES:
        return ObjectType(api_name)
    if not api_name:
        raise invalid(path, "is required")
    found = await find_custom_object(session, tenant, api_name)
    if found is None or found["api_name"] != api_name:
        raise invalid(path, f"{api_name[:100]!r} is neither a core entity type nor a custom object api_name")
    return ObjectType(api_name, found)


@dataclass
class LoadedField:
    """A field row with its options, and the validator's view of it."""

    row: dict[str, Any]
    options: list[dict[str, Any]] = field(default_factory=list)

    @property
    def definition(self) -> FieldDefinition:
        return to_definition(self.row, self.options)


def to_definition(row: Mapping[str, Any], options: Sequence[Mapping[str, Any]]) -> FieldDefinition:
    return FieldDefinition(
        name=row["field_name"],
        field_type=row["field_type"],
        required=row["is_required"],
        unique=row["is_unique"],
        default=row["default_value"],
        rules=dict(row["validation_rules"] or {}),
        options=tuple(
            PicklistOption(
                value=o["option_value"],
                label=o["option_label"],
                order=o["option_order"],
                is_default=o["is_default"],
                is_active=o["is_active"],
            )
            for o in sorted(options, key=lambda o: o["option_order"])
        ),
        reference_to=row["reference_object_type"],
        is_active=row["is_active"],
    )


async def load_fields(
    session: AsyncSession, tenant: str, object_type: str, *, field_ids: Sequence[uuid.UUID] | None = None
) -> list[LoadedField]:
    """The fields of one object type (or the given ids) with their options."""
    query = select(custom_fields).where(custom_fields.c.tenant_id == uuid.UUID(tenant))
    if field_ids is not None:
        query = query.where(custom_fields.c.id.in_(list(field_ids)))
    else:
        query = query.where(custom_fields.c.object_type == object_type)
    # Every record call loads its object's fields: on the driver (shared.db.fetch_rows).
    rows = await fetch_rows(session, query)
    if not rows:
        return []
    option_rows = await fetch_rows(
        session,
        select(custom_field_options).where(
            custom_field_options.c.tenant_id == uuid.UUID(tenant),
            custom_field_options.c.custom_field_id.in_([r["id"] for r in rows]),
        ),
    )
    by_field: dict[uuid.UUID, list[dict[str, Any]]] = {}
    for option in option_rows:
        by_field.setdefault(option["custom_field_id"], []).append(option)
    return [LoadedField(r, by_field.get(r["id"], [])) for r in rows]


async def publish_definition_change(
    session: AsyncSession,
    *,
    tenant: str,
    table: str,
    record_id: uuid.UUID,
    operation: str,
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any] | None,
    version: int,
) -> None:
    """The change event of a definition write plus the control event that tells core-entity and
    the gateway to drop what they cache for the tenant; both commit with the change."""
    await record_change(
        session,
        schema=SCHEMA,
        service=SERVICE,
        table=table,
        tenant_id=tenant,
        record_id=str(record_id),
        operation=operation,
        old=old,
        new=new,
        version=version,
    )
    event = events_pb2.ControlEvent(
        event_id=str(uuid.uuid4()),
        kind=events_pb2.CONTROL_EVENT_KIND_CUSTOM_FIELD_CHANGED,
        tenant_id=tenant,
        resource_id=str(record_id),
        occur_time=timestamp_now(),
    )
    await add_to_outbox(
        session,
        SCHEMA,
        control_subject(events_pb2.CONTROL_EVENT_KIND_CUSTOM_FIELD_CHANGED),
        event.event_id,
        event,
    )


async def publish_record_change(
    session: AsyncSession,
    *,
    tenant: str,
    table: str,
    record_id: uuid.UUID,
    operation: str,
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any] | None,
    version: int,
) -> None:
    await record_change(
        session,
        schema=SCHEMA,
        service=SERVICE,
        table=table,
        tenant_id=tenant,
        record_id=str(record_id),
        operation=operation,
        old=old,
        new=new,
        version=version,
    )


def require_active(custom_object: Mapping[str, Any]) -> None:
    if not custom_object["is_active"]:
        raise FailedPrecondition(f"custom object {custom_object['api_name']!r} is inactive")
