"""Use cases for records of custom objects and many-to-many links: validation through the shared
field-type validator, unique and lookup checks, typed filtering and sorting through the shared
filter parser, and the master-detail cascade on delete."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import delete, func, literal_column, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.custom_object.adapters.core_entities import CoreRecords
from services.custom_object.adapters.indexes import IndexKeeper, json_text, typed_value
from services.custom_object.adapters.tables import (
    custom_fields,
    custom_object_records,
    custom_relationship_data,
    custom_relationships,
)
from services.custom_object.adapters.usage import UsageTracker
from services.custom_object.domain import rules
from services.custom_object.service_layer.common import (
    Guard,
    GuardedUnitOfWork,
    LoadedField,
    actor_id,
    check_etag,
    find_custom_object,
    get_custom_object,
    load_fields,
    parse_id,
    publish_record_change,
    require_active,
    row_dict,
    tenant_id,
    to_definition,
)
from services.custom_object.service_layer.definitions import Page, find_relationship
from shared import paging
from shared.db import fetch_rows
from shared.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    invalid,
)
from shared.fieldtypes import (
    CORE_OBJECT_TYPES,
    REFERENCE_TYPES,
    required_violations,
    validate_values,
)
from shared.filters import Field, FieldSet, FieldType

FIELDS_PATH = "record.fields"
#: How deep a master-detail cascade may go before the delete is refused (cycles are cut anyway).
MAX_CASCADE_DEPTH = 10
#: Most records one delete may take with it.
MAX_CASCADE_RECORDS = 10_000

_FILTER_TYPES: dict[str, FieldType] = {
    "number": FieldType.INTEGER,
    "decimal": FieldType.DECIMAL,
    "currency": FieldType.DECIMAL,
    "percent": FieldType.DECIMAL,
    "date": FieldType.DATE,
    "datetime": FieldType.TIMESTAMP,
    "boolean": FieldType.BOOLEAN,
    "multipicklist": FieldType.STRING_LIST,
}


@dataclass
class RecordView:
    """A record with what the API needs to show it: its object and its field definitions."""

    row: dict[str, Any]
    custom_object: dict[str, Any]
    fields: list[LoadedField]


@dataclass
class DeleteOutcome:
    record_id: uuid.UUID
    cascaded: list[uuid.UUID]
    cleared: int


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _record_bytes(data: Mapping[str, Any]) -> int:
    return len(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode())


def _json_text_of(value: Any) -> str:
    """The text `record_data ->> key` yields for a stored value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value)


def _sqlstate(exc: BaseException) -> str:
    current: BaseException | None = exc
    while current is not None:
        state = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if isinstance(state, str):
            return state
        current = getattr(current, "orig", None) or current.__cause__
    return ""


def _link_json(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    return value


class RecordUseCases:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        core: CoreRecords,
        usage: UsageTracker,
        guard: Guard | None = None,
        keeper: IndexKeeper | None = None,
    ) -> None:
        self._sessions = sessions
        self._core = core
        self._usage = usage
        self._guard = guard
        self._keeper = keeper

    def _uow(self, tenant: str, *, write: bool) -> GuardedUnitOfWork:
        return GuardedUnitOfWork(self._sessions, tenant, self._guard, write)

    # --- helpers --------------------------------------------------------------------------

    def _touch(self, tenant: str, fields: Sequence[LoadedField], names: Iterable[str]) -> None:
        wanted = set(names)
        self._usage.record(tenant, [f.row["id"] for f in fields if f.row["field_name"] in wanted])

    async def _check_unique(
        self,
        s: AsyncSession,
        tenant: str,
        object_id: uuid.UUID,
        fields: Sequence[LoadedField],
        values: Mapping[str, Any],
        own_id: uuid.UUID | None,
    ) -> None:
        """A readable ALREADY_EXISTS before the unique index would refuse the write (the index
        still decides races between concurrent writers)."""
        for loaded in fields:
            name = loaded.row["field_name"]
            if not loaded.row["is_unique"] or values.get(name) is None:
                continue
            query = select(custom_object_records.c.id).where(
                custom_object_records.c.tenant_id == uuid.UUID(tenant),
                custom_object_records.c.custom_object_id == object_id,
                json_text(name) == _json_text_of(values[name]),
            )
            if own_id is not None:
                query = query.where(custom_object_records.c.id != own_id)
            if (await s.execute(query.limit(1))).first() is not None:
                raise AlreadyExists(
                    f"another record already has {name} = {str(values[name])[:100]!r} (unique)"
                )

    async def _check_references(
        self, s: AsyncSession, tenant: str, fields: Sequence[LoadedField], values: Mapping[str, Any]
    ) -> None:
        violations: list[FieldViolation] = []
        for loaded in fields:
            row = loaded.row
            name = row["field_name"]
            if row["field_type"] not in REFERENCE_TYPES or values.get(name) is None:
                continue
            target = row["reference_object_type"]
            record_id = str(values[name])
            if await self._missing(s, tenant, target, [record_id]):
                violations.append(
                    FieldViolation(
                        f"{FIELDS_PATH}.{name}", f"refers to no {target} record {record_id} in this tenant"
                    )
                )
        if violations:
            raise InvalidArgument(violations)

    async def _missing(self, s: AsyncSession, tenant: str, object_type: str, ids: Sequence[str]) -> set[str]:
        """Which of `ids` are not records of `object_type` in the caller's tenant."""
        if object_type in CORE_OBJECT_TYPES:
            return await self._core.missing(object_type, ids)
        target = await find_custom_object(s, tenant, object_type)
        if target is None:
            return set(ids)
        wanted = {uuid.UUID(i) for i in ids}
        found = (
            await s.execute(
                select(custom_object_records.c.id).where(
                    custom_object_records.c.tenant_id == uuid.UUID(tenant),
                    custom_object_records.c.custom_object_id == target["id"],
                    custom_object_records.c.id.in_(list(wanted)),
                )
            )
        ).all()
        present = {str(r.id) for r in found}
        return {i for i in ids if str(uuid.UUID(i)) not in present}

    async def _ensure_indexes(self, s: AsyncSession, fields: Sequence[LoadedField]) -> None:
        if self._keeper is not None:
            await self._keeper.ensure(s, [f.row for f in fields])

    def _check_size(self, data: Mapping[str, Any]) -> None:
        size = _record_bytes(data)
        if size > rules.MAX_RECORD_BYTES:
            raise invalid(
                FIELDS_PATH,
                f"the record's values take {size} bytes of JSON; at most {rules.MAX_RECORD_BYTES}",
            )

    async def _load_record(
        self, s: AsyncSession, tenant: str, record_id: uuid.UUID, *, for_update: bool = False
    ) -> dict[str, Any]:
        query = select(custom_object_records).where(
            custom_object_records.c.tenant_id == uuid.UUID(tenant), custom_object_records.c.id == record_id
        )
        if for_update:
            query = query.with_for_update()
        row = (await s.execute(query)).first()
        if row is None:
            raise NotFound(f"no record {record_id}")
        return row_dict(row)

    async def _object_by_id(self, s: AsyncSession, tenant: str, object_id: uuid.UUID) -> dict[str, Any]:
        return await get_custom_object(s, tenant, str(object_id))

    # --- records --------------------------------------------------------------------------

    async def create_record(self, object_type: str, values: Mapping[str, Any]) -> RecordView:
        tenant = tenant_id()
        if not object_type:
            raise invalid("record.object_type", "is required")
        async with self._uow(tenant, write=True) as uow:
            s = uow.session
            found = await find_custom_object(s, tenant, object_type)
            if found is None or found["api_name"] != object_type:
                raise NotFound(f"no custom object {object_type[:100]!r}")
            require_active(found)
            fields = await load_fields(s, tenant, found["api_name"])
            await self._ensure_indexes(s, fields)
            definitions = [to_definition(f.row, f.options) for f in fields]
            data = validate_values(values, definitions, prefix=FIELDS_PATH).raise_for_violations()
            self._check_size(data)
            await self._check_unique(s, tenant, found["id"], fields, data, None)
            await self._check_references(s, tenant, fields, data)
            now, user = _now(), actor_id()
            row = {
                "id": uuid.uuid4(),
                "tenant_id": uuid.UUID(tenant),
                "custom_object_id": found["id"],
                "record_data": data,
                "version": 1,
                "created_at": now,
                "updated_at": now,
                "created_by": user,
                "updated_by": user,
            }
            await s.execute(custom_object_records.insert().values(**row))
            await publish_record_change(
                s, tenant=tenant, table="custom_object_records", record_id=row["id"], operation="INSERT",
                old=None, new=row, version=1,
            )  # fmt: skip
            await uow.commit()
        self._touch(tenant, fields, data)
        return RecordView(row, found, fields)

    async def get_record(self, key: str) -> RecordView:
        tenant = tenant_id()
        record_id = parse_id(key, "id")
        async with self._uow(tenant, write=False) as uow:
            row = await self._load_record(uow.session, tenant, record_id)
            found = await self._object_by_id(uow.session, tenant, row["custom_object_id"])
            fields = await load_fields(uow.session, tenant, found["api_name"])
        self._touch(tenant, fields, row["record_data"])
        return RecordView(row, found, fields)

    def _field_set(self, fields: Sequence[LoadedField]) -> FieldSet:
        """The whitelist of filterable and sortable names for one object: its active fields,
        typed by field type and read with the same expressions as their indexes, plus id and
        the timestamps. Anything else in a filter or order_by is INVALID_ARGUMENT."""
        known = [
            Field("id", FieldType.UUID, custom_object_records.c.id),
            Field("create_time", FieldType.TIMESTAMP, custom_object_records.c.created_at),
            Field("update_time", FieldType.TIMESTAMP, custom_object_records.c.updated_at),
        ]
        for loaded in fields:
            row = loaded.row
            if not row["is_active"]:
                continue
            field_type = row["field_type"]
            kind = _FILTER_TYPES.get(field_type, FieldType.STRING)
            choices = None
            if field_type == "picklist":
                kind = FieldType.ENUM
                choices = {o["option_value"] for o in loaded.options}
            known.append(
                Field(
                    row["field_name"],
                    kind,
                    typed_value(row["field_name"], field_type),
                    sortable=field_type != "multipicklist",
                    choices=choices,
                )
            )
        return FieldSet(known, custom_object_records.c.id)

    async def list_records(
        self, object_type: str, filter_text: str, order_by: str, page_size: int, page_token: str
    ) -> tuple[list[RecordView], str, int]:
        tenant = tenant_id()
        if not object_type:
            raise invalid("object_type", "is required")
        size = paging.page_size(page_size)
        async with self._uow(tenant, write=False) as uow:
            s = uow.session
            found = await find_custom_object(s, tenant, object_type)
            if found is None or found["api_name"] != object_type:
                raise NotFound(f"no custom object {object_type[:100]!r}")
            fields = await load_fields(s, tenant, found["api_name"])
            await self._ensure_indexes(s, fields)
            field_set = self._field_set(fields)
            condition = field_set.filter(filter_text)
            keys = field_set.order_by(order_by, default=[("create_time", False)])
            fingerprint = paging.query_fingerprint("records", str(found["id"]), filter_text, order_by)
            cursor = paging.decode_token(page_token, fingerprint)
            # The object id is written into the statement (it is a UUID from our own table) so
            # the planner can match the fields' partial indexes, which carry it as a constant.
            in_object = custom_object_records.c.custom_object_id == literal_column(
                f"'{uuid.UUID(str(found['id']))}'::uuid"
            )
            base = [custom_object_records.c.tenant_id == uuid.UUID(tenant), in_object, condition]
            try:
                counting = select(func.count().label("total")).select_from(custom_object_records).where(*base)
                total = (await fetch_rows(s, counting))[0]["total"]
                query = select(custom_object_records).where(*base)
                if cursor is not None:
                    query = query.where(field_set.after(keys, cursor))
                query = query.order_by(*field_set.order_clauses(keys)).limit(size + 1)
                rows = await fetch_rows(s, query)
            except (DBAPIError, asyncpg.PostgresError) as exc:
                # Values the parser accepted but PostgreSQL cannot hold (a decimal like 1e999999
                # overflows numeric): the client's filter, not a server fault.
                if _sqlstate(exc).startswith("22"):
                    raise invalid("filter", "a value is out of range for its field's type") from exc
                raise
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            last = rows[-1]
            token = paging.encode_token(
                field_set.cursor_of(
                    keys,
                    {**last["record_data"], "id": last["id"], "create_time": last["created_at"],
                     "update_time": last["updated_at"]},
                ),
                fingerprint,
            )  # fmt: skip
        used: set[str] = set()
        for row in rows:
            used.update(row["record_data"])
        self._touch(tenant, fields, used)
        return [RecordView(r, found, fields) for r in rows], token, total

    async def update_record(
        self, key: str, etag: str, values: Mapping[str, Any], mask: Sequence[str]
    ) -> RecordView:
        tenant = tenant_id()
        record_id = parse_id(key, "record.id")
        if not mask:
            raise invalid("update_mask", "names no field to change (use fields.<name> or fields)")
        replace_all = False
        names: list[str] = []
        for path in mask:
            if path == "fields":
                replace_all = True
            elif path.startswith("fields.") and len(path) > len("fields."):
                names.append(path.removeprefix("fields."))
            else:
                raise invalid("update_mask", f"{path[:100]!r} is not fields or fields.<name>")
        async with self._uow(tenant, write=True) as uow:
            s = uow.session
            old = await self._load_record(s, tenant, record_id, for_update=True)
            check_etag(etag, old["version"], "record.etag")
            found = await self._object_by_id(s, tenant, old["custom_object_id"])
            require_active(found)
            fields = await load_fields(s, tenant, found["api_name"])
            definitions = [to_definition(f.row, f.options) for f in fields]
            if replace_all:
                new_data = validate_values(values, definitions, prefix=FIELDS_PATH).raise_for_violations()
                changed = dict(new_data)
            else:
                given = {name: values.get(name) for name in names}
                extra = sorted(set(values) - set(names))
                if extra:
                    raise InvalidArgument(
                        [
                            FieldViolation(f"{FIELDS_PATH}.{n}", "is set but not named in update_mask")
                            for n in extra
                        ]
                    )
                changed = validate_values(
                    given, definitions, partial=True, prefix=FIELDS_PATH
                ).raise_for_violations()
                new_data = {k: v for k, v in old["record_data"].items() if k not in given}
                new_data.update(changed)
                missing = required_violations(new_data, definitions, FIELDS_PATH)
                if missing:
                    raise InvalidArgument(missing)
            self._check_size(new_data)
            await self._check_unique(s, tenant, found["id"], fields, changed, record_id)
            await self._check_references(
                s, tenant, fields, {k: v for k, v in changed.items() if old["record_data"].get(k) != v}
            )
            new = {**old, "record_data": new_data, "version": old["version"] + 1, "updated_at": _now(),
                   "updated_by": actor_id()}  # fmt: skip
            await s.execute(
                update(custom_object_records)
                .where(custom_object_records.c.id == record_id)
                .values(record_data=new_data, version=new["version"], updated_at=new["updated_at"],
                        updated_by=new["updated_by"])
            )  # fmt: skip
            await publish_record_change(
                s, tenant=tenant, table="custom_object_records", record_id=record_id, operation="UPDATE",
                old=old, new=new, version=new["version"],
            )  # fmt: skip
            await uow.commit()
        self._touch(tenant, fields, changed)
        return RecordView(new, found, fields)

    async def delete_record(self, key: str, etag: str) -> DeleteOutcome:
        tenant = tenant_id()
        record_id = parse_id(key, "id")
        async with self._uow(tenant, write=True) as uow:
            s = uow.session
            root = await self._load_record(s, tenant, record_id, for_update=True)
            check_etag(etag, root["version"])
            root_type = (await self._object_by_id(s, tenant, root["custom_object_id"]))["api_name"]
            doomed, to_clear = await self._cascade_plan(s, tenant, record_id, root_type, blocking=True)
            cleared = await self._apply_delete(s, tenant, record_id, [root, *doomed], to_clear)
            await uow.commit()
        return DeleteOutcome(record_id, [r["id"] for r in doomed], cleared)

    async def core_record_deleted(self, object_type: str, record_id: uuid.UUID) -> DeleteOutcome:
        """A core record (account, deal...) was deleted in the core-entity service: its
        master-detail children and cascading lookups here go too, other lookups to it become
        empty and its many-to-many links are removed. Required lookups that do not cascade are
        cleared as well: the record they required is gone, and refusing cannot bring it back."""
        tenant = tenant_id()
        async with self._uow(tenant, write=True) as uow:
            s = uow.session
            doomed, to_clear = await self._cascade_plan(s, tenant, record_id, object_type, blocking=False)
            cleared = await self._apply_delete(s, tenant, record_id, doomed, to_clear)
            await uow.commit()
        return DeleteOutcome(record_id, [r["id"] for r in doomed], cleared)

    async def _apply_delete(
        self,
        s: AsyncSession,
        tenant: str,
        root_id: uuid.UUID,
        doomed: list[dict[str, Any]],
        to_clear: dict[uuid.UUID, set[str]],
    ) -> int:
        """Deletes `doomed` (with their events and links) and clears the references in
        `to_clear`; returns how many records had references cleared."""
        for record in doomed:
            await publish_record_change(
                s, tenant=tenant, table="custom_object_records", record_id=record["id"],
                operation="DELETE", old=record, new=None, version=record["version"],
            )  # fmt: skip
        doomed_ids = [r["id"] for r in doomed]
        cleared = 0
        for holder_id, names in to_clear.items():
            if holder_id in doomed_ids:
                continue
            old = await self._load_record(s, tenant, holder_id, for_update=True)
            new_data = {k: v for k, v in old["record_data"].items() if k not in names}
            new = {**old, "record_data": new_data, "version": old["version"] + 1, "updated_at": _now()}
            await s.execute(
                update(custom_object_records)
                .where(custom_object_records.c.id == holder_id)
                .values(record_data=new_data, version=new["version"], updated_at=new["updated_at"])
            )
            await publish_record_change(
                s, tenant=tenant, table="custom_object_records", record_id=holder_id, operation="UPDATE",
                old=old, new=new, version=new["version"],
            )  # fmt: skip
            cleared += 1
        linked = [root_id, *doomed_ids]
        await s.execute(
            delete(custom_relationship_data).where(
                custom_relationship_data.c.tenant_id == uuid.UUID(tenant),
                or_(
                    custom_relationship_data.c.from_record_id.in_(linked),
                    custom_relationship_data.c.to_record_id.in_(linked),
                ),
            )
        )
        if doomed_ids:
            await s.execute(
                delete(custom_object_records).where(
                    custom_object_records.c.tenant_id == uuid.UUID(tenant),
                    custom_object_records.c.id.in_(doomed_ids),
                )
            )
        return cleared

    async def _cascade_plan(
        self, s: AsyncSession, tenant: str, root_id: uuid.UUID, root_type: str, *, blocking: bool
    ) -> tuple[list[dict[str, Any]], dict[uuid.UUID, set[str]]]:
        """Which records go with the root (master-detail children and cascading lookups, at any
        depth) and which references to them become empty. With `blocking`, a required lookup
        that does not cascade refuses the delete (FAILED_PRECONDITION): clearing it would break
        its rule."""
        doomed: dict[uuid.UUID, dict[str, Any]] = {}
        to_clear: dict[uuid.UUID, set[str]] = {}
        queue: deque[tuple[uuid.UUID, str, int]] = deque([(root_id, root_type, 0)])
        while queue:
            record_id, target_type, depth = queue.popleft()
            references = (
                await s.execute(
                    select(custom_fields, custom_relationships.c.cascade_delete)
                    .join(custom_relationships, custom_relationships.c.id == custom_fields.c.relationship_id)
                    .where(
                        custom_fields.c.tenant_id == uuid.UUID(tenant),
                        custom_fields.c.reference_object_type == target_type,
                        custom_fields.c.custom_object_id.is_not(None),
                    )
                )
            ).all()
            for reference in references:
                name = reference.field_name
                holders = (
                    await s.execute(
                        select(custom_object_records)
                        .where(
                            custom_object_records.c.tenant_id == uuid.UUID(tenant),
                            custom_object_records.c.custom_object_id == reference.custom_object_id,
                            typed_value(name, "lookup") == str(record_id),
                        )
                        .with_for_update()
                    )
                ).all()
                for holder in holders:
                    if holder.id in doomed or holder.id == root_id:
                        continue
                    if reference.cascade_delete:
                        if depth + 1 > MAX_CASCADE_DEPTH or len(doomed) >= MAX_CASCADE_RECORDS:
                            raise FailedPrecondition(
                                "deleting this record would cascade deeper than "
                                f"{MAX_CASCADE_DEPTH} levels or over {MAX_CASCADE_RECORDS} records"
                            )
                        doomed[holder.id] = row_dict(holder)
                        queue.append((holder.id, reference.object_type, depth + 1))
                    elif reference.is_required and blocking:
                        raise FailedPrecondition(
                            f"record {holder.id} of {reference.object_type} requires its {name!r} reference "
                            "to this record; delete or repoint it first"
                        )
                    else:
                        to_clear.setdefault(holder.id, set()).add(name)
        return list(doomed.values()), to_clear

    # --- many-to-many links ---------------------------------------------------------------

    async def _m2m(self, s: AsyncSession, tenant: str, key: str) -> dict[str, Any]:
        if not key:
            raise invalid("relationship", "is required")
        relationship = await find_relationship(s, tenant, key)
        if relationship["relationship_type"] != "many_to_many":
            raise FailedPrecondition(
                f"relationship {relationship['relationship_name']!r} is a "
                f"{relationship['relationship_type']}; "
                "link records through many_to_many relationships (set lookups on the record)"
            )
        return relationship

    async def link_records(
        self, relationship_key: str, from_id: str, to_id: str, data: Mapping[str, Any]
    ) -> dict[str, Any]:
        tenant = tenant_id()
        source, target = parse_id(from_id, "from_record_id"), parse_id(to_id, "to_record_id")
        link_data = {str(k): _link_json(v) for k, v in data.items()}
        violations = [
            FieldViolation(f"data.{k}", "must be a name of 1-63 characters")
            for k in link_data
            if not 0 < len(k) <= 63
        ]
        if violations:
            raise InvalidArgument(violations)
        if _record_bytes(link_data) > rules.MAX_LINK_DATA_BYTES:
            raise invalid("data", f"takes more than {rules.MAX_LINK_DATA_BYTES} bytes of JSON")
        async with self._uow(tenant, write=True) as uow:
            s = uow.session
            relationship = await self._m2m(s, tenant, relationship_key)
            bad: list[FieldViolation] = []
            if await self._missing(s, tenant, relationship["from_object_type"], [str(source)]):
                bad.append(
                    FieldViolation(
                        "from_record_id", f"is not a {relationship['from_object_type']} record of this tenant"
                    )
                )
            if await self._missing(s, tenant, relationship["to_object_type"], [str(target)]):
                bad.append(
                    FieldViolation(
                        "to_record_id", f"is not a {relationship['to_object_type']} record of this tenant"
                    )
                )
            if bad:
                raise InvalidArgument(bad)
            exists = (
                await s.execute(
                    select(custom_relationship_data.c.id).where(
                        custom_relationship_data.c.tenant_id == uuid.UUID(tenant),
                        custom_relationship_data.c.relationship_id == relationship["id"],
                        custom_relationship_data.c.from_record_id == source,
                        custom_relationship_data.c.to_record_id == target,
                    )
                )
            ).first()
            if exists is not None:
                raise AlreadyExists("these records are already linked through this relationship")
            row = {
                "id": uuid.uuid4(),
                "tenant_id": uuid.UUID(tenant),
                "relationship_id": relationship["id"],
                "from_record_id": source,
                "to_record_id": target,
                "relationship_data": link_data,
                "created_at": _now(),
                "created_by": actor_id(),
            }
            await s.execute(custom_relationship_data.insert().values(**row))
            await publish_record_change(
                s, tenant=tenant, table="custom_relationship_data", record_id=row["id"], operation="INSERT",
                old=None, new=row, version=1,
            )  # fmt: skip
            await uow.commit()
        return row

    async def unlink_records(self, relationship_key: str, from_id: str, to_id: str) -> dict[str, Any]:
        tenant = tenant_id()
        source, target = parse_id(from_id, "from_record_id"), parse_id(to_id, "to_record_id")
        async with self._uow(tenant, write=True) as uow:
            s = uow.session
            relationship = await self._m2m(s, tenant, relationship_key)
            row = (
                await s.execute(
                    delete(custom_relationship_data)
                    .where(
                        custom_relationship_data.c.tenant_id == uuid.UUID(tenant),
                        custom_relationship_data.c.relationship_id == relationship["id"],
                        custom_relationship_data.c.from_record_id == source,
                        custom_relationship_data.c.to_record_id == target,
                    )
                    .returning(*custom_relationship_data.c)
                )
            ).first()
            if row is None:
                raise NotFound("these records are not linked through this relationship")
            old = row_dict(row)
            await publish_record_change(
                s, tenant=tenant, table="custom_relationship_data", record_id=old["id"], operation="DELETE",
                old=old, new=None, version=1,
            )  # fmt: skip
            await uow.commit()
        return old

    async def list_linked_records(
        self, relationship_key: str, record_id: str, page_size: int, page_token: str
    ) -> Page:
        tenant = tenant_id()
        record = parse_id(record_id, "record_id")
        size = paging.page_size(page_size)
        links = custom_relationship_data.c
        fields = FieldSet([Field("created_at", FieldType.TIMESTAMP, links.created_at)], links.id)
        keys = fields.order_by("created_at")
        async with self._uow(tenant, write=False) as uow:
            s = uow.session
            relationship = await self._m2m(s, tenant, relationship_key)
            fingerprint = paging.query_fingerprint("links", str(relationship["id"]), str(record))
            cursor = paging.decode_token(page_token, fingerprint)
            base = [
                links.tenant_id == uuid.UUID(tenant),
                links.relationship_id == relationship["id"],
                or_(links.from_record_id == record, links.to_record_id == record),
            ]
            total = (await s.execute(select(func.count()).where(*base))).scalar_one()
            query = select(custom_relationship_data).where(*base)
            if cursor is not None:
                query = query.where(fields.after(keys, cursor))
            rows = [
                row_dict(r)
                for r in (await s.execute(query.order_by(*fields.order_clauses(keys)).limit(size + 1))).all()
            ]
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = paging.encode_token(fields.cursor_of(keys, rows[-1]), fingerprint)
        return Page(rows, token, total)
