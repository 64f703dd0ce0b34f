"""Use cases for definitions: custom objects, custom fields with their picklist options, and
relationships. Every write publishes a change event and a CUSTOM_FIELD_CHANGED control event in
the same transaction; index DDL runs after the commit (it cannot run inside a transaction)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, delete, func, literal_column, or_, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.custom_object.adapters.indexes import (
    IndexBuilder,
    IndexBuildFailed,
    IndexKeeper,
    checked_field_name,
    json_text,
    specs_of,
)
from services.custom_object.adapters.tables import (
    custom_field_options,
    custom_fields,
    custom_object_records,
    custom_objects,
    custom_relationships,
)
from services.custom_object.adapters.usage import UsageTracker
from services.custom_object.domain import rules
from services.custom_object.service_layer.common import (
    Guard,
    GuardedUnitOfWork,
    LoadedField,
    ObjectType,
    actor_id,
    check_etag,
    get_custom_object,
    load_fields,
    parse_id,
    publish_definition_change,
    publish_record_change,
    resolve_object_type,
    row_dict,
    tenant_id,
    to_definition,
)
from shared import paging
from shared.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    invalid,
)
from shared.fieldtypes import (
    CORE_OBJECT_TYPES,
    FIELD_TYPES,
    REFERENCE_TYPES,
    FieldDefinition,
    PicklistOption,
    data_type_for,
    default_for,
    validate_definition,
    validate_values,
)
from shared.filters import Field, FieldSet, FieldType
from shared.logging import get_logger

log = get_logger(__name__)

OBJECT_MUTABLE = frozenset(
    {"name", "label", "plural_label", "description", "is_active", "allow_reports", "allow_activities",
     "record_name_field", "icon", "color"}
)  # fmt: skip
FIELD_MUTABLE = frozenset(
    {"field_label", "field_type", "data_type", "is_required", "is_unique", "is_indexed", "default_value",
     "help_text", "field_order", "validation_rules", "display_options", "is_active", "options",
     "metadata.compliance_tags"}
)  # fmt: skip


@dataclass
class Page:
    items: list[Any]
    next_page_token: str
    total_size: int


@dataclass
class FieldView:
    """A field as the API shows it: row, options and live usage."""

    row: dict[str, Any]
    options: list[dict[str, Any]] = field(default_factory=list)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _option_rows(options: Iterable[Mapping[str, Any]]) -> list[PicklistOption]:
    return [
        PicklistOption(
            value=str(o.get("value", "")),
            label=str(o.get("label") or o.get("value", "")),
            order=int(o.get("order", 0)),
            is_default=bool(o.get("is_default", False)),
            is_active=bool(o.get("is_active", True)),
        )
        for o in options
    ]


class DefinitionUseCases:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        indexes: IndexBuilder | None,
        usage: UsageTracker,
        guard: Guard | None = None,
        keeper: IndexKeeper | None = None,
    ) -> None:
        self._sessions = sessions
        self._indexes = indexes
        self._usage = usage
        self._guard = guard
        self._keeper = keeper

    def _uow(self, tenant: str, *, write: bool) -> GuardedUnitOfWork:
        return GuardedUnitOfWork(self._sessions, tenant, self._guard, write)

    # --- custom objects -------------------------------------------------------------------

    async def create_custom_object(self, values: dict[str, Any]) -> dict[str, Any]:
        tenant = tenant_id()
        violations = rules.object_violations(values, creating=True)
        if violations:
            raise InvalidArgument(violations)
        async with self._uow(tenant, write=True) as uow:
            s = uow.session
            count = (
                await s.execute(select(func.count()).where(custom_objects.c.tenant_id == uuid.UUID(tenant)))
            ).scalar_one()
            if count >= rules.MAX_OBJECTS_PER_TENANT:
                raise ResourceExhausted(
                    f"a tenant has at most {rules.MAX_OBJECTS_PER_TENANT} custom objects; delete one first"
                )
            clash = (
                await s.execute(
                    select(custom_objects.c.api_name, custom_objects.c.name).where(
                        custom_objects.c.tenant_id == uuid.UUID(tenant),
                        or_(
                            custom_objects.c.api_name == values["api_name"],
                            custom_objects.c.name == values["name"],
                        ),
                    )
                )
            ).first()
            if clash is not None:
                which = "api_name" if clash.api_name == values["api_name"] else "name"
                raise AlreadyExists(f"a custom object with {which} {values[which]!r} already exists")
            now, user = _now(), actor_id()
            row = {
                "id": uuid.uuid4(),
                "tenant_id": uuid.UUID(tenant),
                "name": values["name"],
                "label": values["label"],
                "plural_label": values["plural_label"],
                "description": values.get("description") or "",
                "api_name": values["api_name"],
                "is_active": values.get("is_active", True),
                "allow_reports": values.get("allow_reports", True),
                "allow_activities": values.get("allow_activities", True),
                "record_name_field": values.get("record_name_field") or None,
                "icon": values.get("icon") or None,
                "color": values.get("color") or None,
                "version": 1,
                "created_at": now,
                "updated_at": now,
                "created_by": user,
                "updated_by": user,
            }
            await s.execute(custom_objects.insert().values(**row))
            await publish_definition_change(
                s, tenant=tenant, table="custom_objects", record_id=row["id"], operation="INSERT",
                old=None, new=row, version=1,
            )  # fmt: skip
            await uow.commit()
        return row

    async def get_custom_object(self, key: str) -> dict[str, Any]:
        tenant = tenant_id()
        if not key:
            raise invalid("id", "is required")
        async with self._uow(tenant, write=False) as uow:
            return await get_custom_object(uow.session, tenant, key)

    async def list_custom_objects(self, page_size: int, page_token: str, show_inactive: bool) -> Page:
        tenant = tenant_id()
        size = paging.page_size(page_size)
        fields = FieldSet(
            [Field("api_name", FieldType.STRING, custom_objects.c.api_name)], custom_objects.c.id
        )
        keys = fields.order_by("api_name")
        fingerprint = paging.query_fingerprint("custom_objects", show_inactive)
        cursor = paging.decode_token(page_token, fingerprint)
        base = [custom_objects.c.tenant_id == uuid.UUID(tenant)]
        if not show_inactive:
            base.append(custom_objects.c.is_active.is_(True))
        async with self._uow(tenant, write=False) as uow:
            total = (await uow.session.execute(select(func.count()).where(*base))).scalar_one()
            query = select(custom_objects).where(*base).order_by(*fields.order_clauses(keys)).limit(size + 1)
            if cursor is not None:
                query = query.where(fields.after(keys, cursor))
            rows = [row_dict(r) for r in (await uow.session.execute(query)).all()]
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = paging.encode_token(fields.cursor_of(keys, rows[-1]), fingerprint)
        return Page(rows, token, total)

    async def update_custom_object(
        self, key: str, etag: str, values: dict[str, Any], mask: list[str]
    ) -> dict[str, Any]:
        tenant = tenant_id()
        if not mask:
            raise invalid("update_mask", "names no field to change")
        for path in mask:
            if path == "api_name":
                raise invalid("update_mask", "api_name cannot change (records and fields refer to it)")
            if path not in OBJECT_MUTABLE:
                raise invalid("update_mask", f"{path!r} is not a field that can be updated")
        changes = {path: values.get(path) for path in mask}
        violations = rules.object_violations(changes, creating=False)
        if violations:
            raise InvalidArgument(violations)
        async with self._uow(tenant, write=True) as uow:
            s = uow.session
            old = await get_custom_object(s, tenant, key, for_update=True)
            check_etag(etag, old["version"])
            if changes.get("record_name_field"):
                names = {f.row["field_name"] for f in await load_fields(s, tenant, old["api_name"])}
                if changes["record_name_field"] not in names:
                    raise invalid("custom_object.record_name_field", "is not a field of this object")
            if "name" in changes and changes["name"] != old["name"]:
                taken = (
                    await s.execute(
                        select(custom_objects.c.id).where(
                            custom_objects.c.tenant_id == uuid.UUID(tenant),
                            custom_objects.c.name == changes["name"],
                        )
                    )
                ).first()
                if taken is not None:
                    raise AlreadyExists(f"a custom object named {changes['name']!r} already exists")
            for optional in ("record_name_field", "icon", "color"):
                if optional in changes and not changes[optional]:
                    changes[optional] = None
            if "description" in changes:
                changes["description"] = changes["description"] or ""
            new = {
                **old,
                **changes,
                "version": old["version"] + 1,
                "updated_at": _now(),
                "updated_by": actor_id(),
            }
            await s.execute(update(custom_objects).where(custom_objects.c.id == old["id"]).values(
                **{k: new[k] for k in (*changes, "version", "updated_at", "updated_by")}
            ))  # fmt: skip
            await publish_definition_change(
                s, tenant=tenant, table="custom_objects", record_id=old["id"], operation="UPDATE",
                old=old, new=new, version=new["version"],
            )  # fmt: skip
            await uow.commit()
        return new

    async def delete_custom_object(self, key: str, etag: str, force: bool) -> dict[str, Any]:
        tenant = tenant_id()
        if not key:
            raise invalid("id", "is required")
        dropped_fields: list[uuid.UUID] = []
        async with self._uow(tenant, write=True) as uow:
            s = uow.session
            old = await get_custom_object(s, tenant, key, for_update=True)
            check_etag(etag, old["version"])
            records = (
                await s.execute(
                    select(custom_object_records).where(
                        custom_object_records.c.tenant_id == uuid.UUID(tenant),
                        custom_object_records.c.custom_object_id == old["id"],
                    )
                )
            ).all()
            if records and not force:
                raise FailedPrecondition(
                    f"custom object {old['api_name']!r} has {len(records)} record(s); "
                    "delete them or pass force"
                )
            # Reference fields on other objects that point here go with the relationships.
            pointing = (
                await s.execute(
                    select(
                        custom_fields.c.id,
                        custom_fields.c.object_type,
                        custom_fields.c.field_name,
                        custom_fields.c.field_type,
                    ).where(
                        custom_fields.c.tenant_id == uuid.UUID(tenant),
                        custom_fields.c.reference_object_type == old["api_name"],
                        custom_fields.c.object_type != old["api_name"],
                    )
                )
            ).all()
            details = [f"{r.object_type}.{r.field_name}" for r in pointing if r.field_type == "master_detail"]
            if records and details:
                # Its records are masters: deleting them here would orphan the detail records.
                raise FailedPrecondition(
                    f"records of {old['api_name']!r} are masters of {', '.join(details)}; delete those "
                    "relationships (or the records) first"
                )
            for ref in pointing:
                await self._remove_field_values(s, tenant, ref.object_type, ref.field_name)
                await s.execute(delete(custom_fields).where(custom_fields.c.id == ref.id))
                dropped_fields.append(ref.id)
            own = (
                await s.execute(
                    select(custom_fields.c.id).where(
                        custom_fields.c.tenant_id == uuid.UUID(tenant),
                        custom_fields.c.custom_object_id == old["id"],
                    )
                )
            ).all()
            dropped_fields += [r.id for r in own]
            for record in records:
                data = row_dict(record)
                await publish_record_change(
                    s, tenant=tenant, table="custom_object_records", record_id=data["id"], operation="DELETE",
                    old=data, new=None, version=data["version"],
                )  # fmt: skip
            # Fields, options, relationships, links and records cascade by foreign key.
            await s.execute(delete(custom_objects).where(custom_objects.c.id == old["id"]))
            await publish_definition_change(
                s, tenant=tenant, table="custom_objects", record_id=old["id"], operation="DELETE",
                old=old, new=None, version=old["version"],
            )  # fmt: skip
            await uow.commit()
        await self._drop_indexes(dropped_fields)
        return old

    # --- custom fields --------------------------------------------------------------------

    async def create_custom_field(self, values: dict[str, Any]) -> FieldView:
        tenant = tenant_id()
        field_type = values.get("field_type", "")
        if field_type in REFERENCE_TYPES:
            raise invalid(
                "field.field_type",
                f"{field_type} fields are created with CreateCustomRelationship, "
                "which also records the relationship",
            )
        view = await self._create_field(tenant, values, reference_to=None, relationship_id=None)
        await self._after_index_change(tenant, view.row, old=None)
        return await self._reload(tenant, view.row["id"])

    async def _create_field(
        self,
        tenant: str,
        values: dict[str, Any],
        *,
        reference_to: str | None,
        relationship_id: uuid.UUID | None,
        session: AsyncSession | None = None,
    ) -> FieldView:
        """Validates and inserts a field; in `session` when given (relationships), otherwise in
        its own unit of work."""
        definition, options, violations = self._definition_from(values, reference_to)
        violations += rules.field_name_violations("field.field_name", str(values.get("field_name", "")))
        violations += rules.text_violations(
            "field.field_label", str(values.get("field_label", "")), required=True, max_length=255
        )
        violations += rules.compliance_tag_violations(list(values.get("compliance_tags", [])))
        if violations:
            raise InvalidArgument(violations)
        if session is None:
            async with self._uow(tenant, write=True) as uow:
                view = await self._insert_field(
                    uow.session, tenant, values, definition, options, reference_to, relationship_id
                )
                await uow.commit()
            return view
        return await self._insert_field(
            session, tenant, values, definition, options, reference_to, relationship_id
        )

    def _definition_from(
        self, values: Mapping[str, Any], reference_to: str | None, path: str = "field"
    ) -> tuple[FieldDefinition, list[PicklistOption], list[FieldViolation]]:
        field_type = str(values.get("field_type", ""))
        options = _option_rows(values.get("options", []))
        rules_given = {k: v for k, v in dict(values.get("validation_rules") or {}).items() if v is not None}
        definition = FieldDefinition(
            name=str(values.get("field_name", "")),
            field_type=field_type,
            required=bool(values.get("is_required", False)),
            unique=bool(values.get("is_unique", False)),
            default=values.get("default_value"),
            rules=rules_given,
            options=tuple(options),
            reference_to=reference_to,
            is_active=bool(values.get("is_active", True)),
        )
        violations = validate_definition(definition, path)
        violations += rules.data_type_violation(
            field_type, str(values.get("data_type") or ""), f"{path}.data_type"
        )
        if field_type in FIELD_TYPES:
            violations += rules.index_violations(definition, bool(values.get("is_indexed", False)), path)
        return definition, options, violations

    async def _insert_field(
        self,
        s: AsyncSession,
        tenant: str,
        values: Mapping[str, Any],
        definition: FieldDefinition,
        options: list[PicklistOption],
        reference_to: str | None,
        relationship_id: uuid.UUID | None,
    ) -> FieldView:
        target = await resolve_object_type(s, tenant, str(values.get("object_type", "")), "field.object_type")
        count = (
            await s.execute(
                select(func.count()).where(
                    custom_fields.c.tenant_id == uuid.UUID(tenant),
                    custom_fields.c.object_type == target.api_name,
                )
            )
        ).scalar_one()
        if count >= rules.MAX_FIELDS_PER_OBJECT:
            raise ResourceExhausted(f"an object has at most {rules.MAX_FIELDS_PER_OBJECT} custom fields")
        taken = (
            await s.execute(
                select(custom_fields.c.id).where(
                    custom_fields.c.tenant_id == uuid.UUID(tenant),
                    custom_fields.c.object_type == target.api_name,
                    custom_fields.c.field_name == definition.name,
                )
            )
        ).first()
        if taken is not None:
            raise AlreadyExists(f"{target.api_name} already has a field named {definition.name!r}")
        cleaned_default = default_for(definition) if definition.default is not None else None
        if definition.required and target.object_id is not None and definition.is_active:
            await self._backfill_required(s, tenant, target, definition, cleaned_default)
        indexed = bool(values.get("is_indexed", False)) or definition.field_type in REFERENCE_TYPES
        now, user = _now(), actor_id()
        row = {
            "id": uuid.uuid4(),
            "tenant_id": uuid.UUID(tenant),
            "object_type": target.api_name,
            "custom_object_id": target.object_id,
            "field_name": definition.name,
            "field_label": values.get("field_label", ""),
            "field_type": definition.field_type,
            "data_type": data_type_for(definition.field_type),
            "is_required": definition.required,
            "is_unique": definition.unique,
            "is_indexed": indexed,
            "default_value": cleaned_default,
            "help_text": values.get("help_text") or "",
            "field_order": int(values.get("field_order", 0)),
            "validation_rules": dict(definition.rules),
            "display_options": dict(values.get("display_options") or {}),
            "is_active": definition.is_active,
            "reference_object_type": reference_to,
            "relationship_id": relationship_id,
            "metadata": {
                "created_version": rules.definition_version(1),
                "last_modified_version": rules.definition_version(1),
                "performance_impact": rules.performance_impact(definition, indexed),
                "compliance_tags": sorted(set(values.get("compliance_tags", []))),
            },
            "usage_count": 0,
            "last_used_at": None,
            # Indexes exist only for custom objects' records; core tables belong to core-entity.
            "index_state": "building"
            if target.object_id is not None and (indexed or definition.unique)
            else "none",
            "version": 1,
            "created_at": now,
            "updated_at": now,
            "created_by": user,
            "updated_by": user,
        }
        await s.execute(custom_fields.insert().values(**row))
        option_rows = await self._write_options(s, tenant, row["id"], options)
        await publish_definition_change(
            s, tenant=tenant, table="custom_fields", record_id=row["id"], operation="INSERT",
            old=None, new={**row, "options": option_rows}, version=1,
        )  # fmt: skip
        return FieldView(row, option_rows)

    async def _write_options(
        self, s: AsyncSession, tenant: str, field_id: uuid.UUID, options: list[PicklistOption]
    ) -> list[dict[str, Any]]:
        await s.execute(
            delete(custom_field_options).where(custom_field_options.c.custom_field_id == field_id)
        )
        rows = [
            {
                "id": uuid.uuid4(),
                "tenant_id": uuid.UUID(tenant),
                "custom_field_id": field_id,
                "option_value": o.value,
                "option_label": o.label or o.value,
                "option_order": o.order,
                "is_default": o.is_default,
                "is_active": o.is_active,
                "created_at": _now(),
            }
            for o in options
        ]
        if rows:
            await s.execute(custom_field_options.insert(), rows)
        return rows

    async def _backfill_required(
        self, s: AsyncSession, tenant: str, target: ObjectType, definition: FieldDefinition, default: Any
    ) -> None:
        """A field that becomes required on an object with records needs a value in each: the
        default fills records without one; with no default it is FAILED_PRECONDITION."""
        missing = custom_object_records.c.record_data.op("?", is_comparison=True)(definition.name)
        scope = [
            custom_object_records.c.tenant_id == uuid.UUID(tenant),
            custom_object_records.c.custom_object_id == target.object_id,
            ~missing,
        ]
        lacking = (await s.execute(select(func.count()).where(*scope))).scalar_one()
        if not lacking:
            return
        if default is None:
            raise FailedPrecondition(
                f"{lacking} record(s) of {target.api_name} have no value for {definition.name!r}; "
                "give the field a default value to make it required"
            )
        await s.execute(
            update(custom_object_records)
            .where(*scope)
            .values(
                record_data=custom_object_records.c.record_data.op("||")(
                    _json_param({definition.name: default})
                ),
                version=custom_object_records.c.version + 1,
                updated_at=_now(),
            )
        )

    async def list_custom_fields(
        self, object_type: str, page_size: int, page_token: str, show_inactive: bool
    ) -> Page:
        tenant = tenant_id()
        size = paging.page_size(page_size)
        fields = FieldSet(
            [
                Field("object_type", FieldType.STRING, custom_fields.c.object_type),
                Field("field_order", FieldType.INTEGER, custom_fields.c.field_order),
                Field("field_name", FieldType.STRING, custom_fields.c.field_name),
            ],
            custom_fields.c.id,
        )
        keys = fields.order_by("object_type, field_order, field_name")
        fingerprint = paging.query_fingerprint("custom_fields", object_type, show_inactive)
        cursor = paging.decode_token(page_token, fingerprint)
        base = [custom_fields.c.tenant_id == uuid.UUID(tenant)]
        if object_type:
            base.append(custom_fields.c.object_type == object_type)
        if not show_inactive:
            base.append(custom_fields.c.is_active.is_(True))
        async with self._uow(tenant, write=False) as uow:
            total = (await uow.session.execute(select(func.count()).where(*base))).scalar_one()
            query = (
                select(custom_fields.c.id).where(*base).order_by(*fields.order_clauses(keys)).limit(size + 1)
            )
            if cursor is not None:
                query = query.where(fields.after(keys, cursor))
            ids = [r.id for r in (await uow.session.execute(query)).all()]
            loaded = {f.row["id"]: f for f in await load_fields(uow.session, tenant, "", field_ids=ids)}
        views = [self._view(tenant, loaded[i]) for i in ids if i in loaded]
        token = ""
        if len(views) > size:
            views = views[:size]
            token = paging.encode_token(fields.cursor_of(keys, views[-1].row), fingerprint)
        return Page(views, token, total)

    def _view(self, tenant: str, loaded: LoadedField) -> FieldView:
        row = dict(loaded.row)
        field_id = row["id"]
        row["usage_count"] = row["usage_count"] + self._usage.pending(tenant, field_id)
        recent = self._usage.last_used(field_id)
        if recent is not None and (row["last_used_at"] is None or recent > row["last_used_at"]):
            row["last_used_at"] = recent
        return FieldView(row, sorted(loaded.options, key=lambda o: o["option_order"]))

    async def _reload(self, tenant: str, field_id: uuid.UUID) -> FieldView:
        async with self._uow(tenant, write=False) as uow:
            loaded = await load_fields(uow.session, tenant, "", field_ids=[field_id])
        if not loaded:
            raise NotFound("the field was deleted meanwhile")
        return self._view(tenant, loaded[0])

    async def update_custom_field(
        self, key: str, etag: str, values: dict[str, Any], mask: list[str]
    ) -> FieldView:
        tenant = tenant_id()
        field_id = parse_id(key, "field.id")
        if not mask:
            raise invalid("update_mask", "names no field to change")
        for path in mask:
            if path in ("object_type", "field_name"):
                raise invalid("update_mask", f"{path} cannot change; create a new field instead")
            if path not in FIELD_MUTABLE:
                raise invalid("update_mask", f"{path!r} is not a field that can be updated")
        async with self._uow(tenant, write=True) as uow:
            s = uow.session
            locked = (
                await s.execute(
                    select(custom_fields)
                    .where(custom_fields.c.tenant_id == uuid.UUID(tenant), custom_fields.c.id == field_id)
                    .with_for_update()
                )
            ).first()
            if locked is None:
                raise NotFound(f"no custom field {key}")
            (loaded,) = await load_fields(s, tenant, "", field_ids=[field_id])
            old = loaded.row
            check_etag(etag, old["version"])
            merged: dict[str, Any] = {
                "field_name": old["field_name"],
                "field_type": old["field_type"],
                "is_required": old["is_required"],
                "is_unique": old["is_unique"],
                "is_indexed": old["is_indexed"],
                "default_value": old["default_value"],
                "validation_rules": old["validation_rules"],
                "is_active": old["is_active"],
                "options": [
                    {"value": o["option_value"], "label": o["option_label"], "order": o["option_order"],
                     "is_default": o["is_default"], "is_active": o["is_active"]}
                    for o in loaded.options
                ],
            }  # fmt: skip
            for path in mask:
                if path == "metadata.compliance_tags":
                    merged["compliance_tags"] = list(values.get("compliance_tags", []))
                else:
                    merged[path] = values.get(path)
            if "field_type" in mask and merged["field_type"] != old["field_type"]:
                if old["field_type"] in REFERENCE_TYPES or merged["field_type"] in REFERENCE_TYPES:
                    raise FailedPrecondition("lookup and master_detail fields belong to their relationship")
                if "data_type" not in mask:
                    merged["data_type"] = ""
                if "validation_rules" not in mask and merged["field_type"] in FIELD_TYPES:
                    # Rules the new type does not know (max_length on a number) are dropped
                    # rather than refused; the new type's defaults apply.
                    allowed = FIELD_TYPES[merged["field_type"]].allowed_rules
                    merged["validation_rules"] = {
                        k: v for k, v in (old["validation_rules"] or {}).items() if k in allowed
                    }
            if old["field_type"] in REFERENCE_TYPES and {"is_required", "is_unique"} & set(mask):
                raise FailedPrecondition(
                    "a reference field's required and unique flags follow its relationship"
                )
            definition, options, violations = self._definition_from(merged, old["reference_object_type"])
            violations += rules.compliance_tag_violations(list(merged.get("compliance_tags", [])))
            if "field_label" in mask:
                violations += rules.text_violations(
                    "field.field_label", str(values.get("field_label") or ""), required=True, max_length=255
                )
            if violations:
                raise InvalidArgument(violations)
            object_id = old["custom_object_id"]
            if object_id is not None:
                await self._migrate_values(s, tenant, old, definition)
                if definition.unique and not old["is_unique"]:
                    await self._assert_no_duplicates(s, tenant, object_id, definition.name)
                if (
                    definition.required
                    and definition.is_active
                    and not (old["is_required"] and old["is_active"])
                ):
                    await self._backfill_required(
                        s, tenant, ObjectType(old["object_type"], {"id": object_id}), definition,
                        default_for(definition),
                    )  # fmt: skip
            elif "field_type" in mask and merged["field_type"] != old["field_type"]:
                raise FailedPrecondition(
                    "the values of fields on core entity types live in the core-entity service; "
                    "their type cannot change here: create a new field and copy the values"
                )
            indexed = bool(merged["is_indexed"])
            version = old["version"] + 1
            index_changed = object_id is not None and (
                indexed != old["is_indexed"]
                or definition.unique != old["is_unique"]
                or definition.field_type != old["field_type"]
            )
            changes = {
                "field_label": values.get("field_label") if "field_label" in mask else old["field_label"],
                "field_type": definition.field_type,
                "data_type": data_type_for(definition.field_type),
                "is_required": definition.required,
                "is_unique": definition.unique,
                "is_indexed": indexed,
                "default_value": default_for(definition) if definition.default is not None else None,
                "help_text": (values.get("help_text") or "") if "help_text" in mask else old["help_text"],
                "field_order": int(values.get("field_order") or 0)
                if "field_order" in mask
                else old["field_order"],
                "validation_rules": dict(definition.rules),
                "display_options": dict(values.get("display_options") or {})
                if "display_options" in mask
                else old["display_options"],
                "is_active": definition.is_active,
                "metadata": {
                    **old["metadata"],
                    "last_modified_version": rules.definition_version(version),
                    "performance_impact": rules.performance_impact(definition, indexed),
                    "compliance_tags": sorted(
                        set(merged.get("compliance_tags", old["metadata"].get("compliance_tags", [])))
                    ),
                },
                "index_state": ("building" if indexed or definition.unique else "none")
                if index_changed
                else old["index_state"],
                "version": version,
                "updated_at": _now(),
                "updated_by": actor_id(),
            }
            await s.execute(update(custom_fields).where(custom_fields.c.id == field_id).values(**changes))
            option_rows = loaded.options
            if "options" in mask:
                option_rows = await self._write_options(s, tenant, field_id, options)
            new = {**old, **changes}
            await publish_definition_change(
                s, tenant=tenant, table="custom_fields", record_id=field_id, operation="UPDATE",
                old={**old, "options": loaded.options}, new={**new, "options": option_rows}, version=version,
            )  # fmt: skip
            await uow.commit()
        if index_changed:
            if self._indexes is not None:
                await self._indexes.drop(field_id)
            await self._after_index_change(tenant, new, old=old)
        return await self._reload(tenant, field_id)

    async def _migrate_values(
        self, s: AsyncSession, tenant: str, old: Mapping[str, Any], definition: FieldDefinition
    ) -> None:
        """On a type change, every stored value must be valid under the new type; they are
        rewritten in the new canonical form, or the change is FAILED_PRECONDITION."""
        if definition.field_type == old["field_type"]:
            return
        key = definition.name
        rows = (
            await s.execute(
                select(custom_object_records.c.id, custom_object_records.c.record_data[key].label("value"))
                .where(
                    custom_object_records.c.tenant_id == uuid.UUID(tenant),
                    custom_object_records.c.custom_object_id == old["custom_object_id"],
                    custom_object_records.c.record_data.op("?", is_comparison=True)(key),
                )
                .with_for_update()
            )
        ).all()
        probe = FieldDefinition(
            key, definition.field_type, rules=definition.rules, options=definition.options
        )
        failures: list[str] = []
        converted: dict[uuid.UUID, Any] = {}
        for row in rows:
            value = row.value
            if definition.field_type in (
                "text",
                "textarea",
                "email",
                "phone",
                "url",
                "picklist",
            ) and not isinstance(value, str | type(None)):
                value = str(value).lower() if isinstance(value, bool) else str(value)
            result = validate_values({key: value}, [probe], partial=True)
            if result.violations:
                failures.append(f"record {row.id}: {result.violations[0].description}")
            else:
                converted[row.id] = result.values.get(key)
        if failures:
            raise FailedPrecondition(
                f"{len(failures)} stored value(s) of {key!r} cannot become {definition.field_type}: "
                + "; ".join(failures[:3])
            )
        for record_id, value in converted.items():
            await s.execute(
                update(custom_object_records)
                .where(custom_object_records.c.id == record_id)
                .values(
                    record_data=custom_object_records.c.record_data.op("||")(_json_param({key: value})),
                    version=custom_object_records.c.version + 1,
                )
            )

    async def _assert_no_duplicates(
        self, s: AsyncSession, tenant: str, object_id: uuid.UUID, name: str
    ) -> None:
        value = json_text(name)
        duplicate = (
            await s.execute(
                select(value.label("value"), func.count().label("n"))
                .where(
                    custom_object_records.c.tenant_id == uuid.UUID(tenant),
                    custom_object_records.c.custom_object_id == object_id,
                    value.is_not(None),
                )
                .group_by(value)
                .having(func.count() > 1)
                .limit(1)
            )
        ).first()
        if duplicate is not None:
            raise FailedPrecondition(
                f"{duplicate.n} records share the value {str(duplicate.value)[:60]!r} of {name!r}; "
                "make the values unique before making the field unique"
            )

    async def _after_index_change(
        self, tenant: str, row: Mapping[str, Any], old: Mapping[str, Any] | None
    ) -> None:
        """Builds the field's indexes after its definition committed, and records the outcome."""
        if row["custom_object_id"] is None or row["index_state"] != "building":
            return
        state = "ready"
        if self._keeper is not None:
            self._keeper.forget(row["id"])
        if self._indexes is not None:
            try:
                for spec in specs_of(row):
                    await self._indexes.build(spec)
            except IndexBuildFailed as exc:
                log.warning("field index build failed", field_id=str(row["id"]), error=str(exc))
                state = "failed"
        async with self._uow(tenant, write=True) as uow:
            await uow.session.execute(
                update(custom_fields)
                .where(custom_fields.c.id == row["id"], custom_fields.c.index_state == "building")
                .values(index_state=state)
            )
            await uow.commit()
        if state == "failed":
            raise FailedPrecondition(
                f"the index of {row['field_name']!r} could not be built (duplicate values under a unique "
                "index?); the field is saved with index_state failed: fix the values and update it again"
            )

    async def _drop_indexes(self, field_ids: Iterable[uuid.UUID]) -> None:
        if self._indexes is None:
            return
        for field_id in field_ids:
            if self._keeper is not None:
                self._keeper.forget(field_id)
            try:
                await self._indexes.drop(field_id)
            except Exception as exc:  # an orphan index is harmless; the definition is gone
                log.warning("dropping a field index failed", field_id=str(field_id), error=str(exc))

    async def _remove_field_values(self, s: AsyncSession, tenant: str, object_type: str, name: str) -> None:
        await s.execute(
            update(custom_object_records)
            .where(
                custom_object_records.c.tenant_id == uuid.UUID(tenant),
                custom_object_records.c.custom_object_id.in_(
                    select(custom_objects.c.id).where(
                        custom_objects.c.tenant_id == uuid.UUID(tenant),
                        custom_objects.c.api_name == object_type,
                    )
                ),
                custom_object_records.c.record_data.op("?", is_comparison=True)(name),
            )
            .values(
                record_data=custom_object_records.c.record_data.op("-")(
                    literal_column(f"'{checked_field_name(name)}'")
                ),
                version=custom_object_records.c.version + 1,
                updated_at=_now(),
            )
        )

    async def delete_custom_field(self, key: str, etag: str) -> FieldView:
        tenant = tenant_id()
        field_id = parse_id(key, "id")
        async with self._uow(tenant, write=True) as uow:
            s = uow.session
            loaded = await load_fields(s, tenant, "", field_ids=[field_id])
            if not loaded:
                raise NotFound(f"no custom field {key}")
            old = loaded[0].row
            check_etag(etag, old["version"])
            if old["relationship_id"] is not None:
                raise FailedPrecondition(
                    "this field belongs to a relationship; delete the relationship (DeleteCustomRelationship)"
                )
            await self._delete_field(s, tenant, loaded[0])
            await uow.commit()
        await self._drop_indexes([field_id])
        return FieldView(old, loaded[0].options)

    async def _delete_field(self, s: AsyncSession, tenant: str, loaded: LoadedField) -> None:
        old = loaded.row
        if old["custom_object_id"] is not None:
            await self._remove_field_values(s, tenant, old["object_type"], old["field_name"])
            await s.execute(
                update(custom_objects)
                .where(
                    custom_objects.c.id == old["custom_object_id"],
                    custom_objects.c.record_name_field == old["field_name"],
                )
                .values(record_name_field=None)
            )
        await s.execute(delete(custom_fields).where(custom_fields.c.id == old["id"]))
        await publish_definition_change(
            s, tenant=tenant, table="custom_fields", record_id=old["id"], operation="DELETE",
            old={**old, "options": loaded.options}, new=None, version=old["version"],
        )  # fmt: skip

    # --- relationships --------------------------------------------------------------------

    async def create_relationship(self, values: dict[str, Any]) -> dict[str, Any]:
        tenant = tenant_id()
        violations = rules.relationship_violations(values)
        if violations:
            raise InvalidArgument(violations)
        kind, cardinality = values["relationship_type"], values["cardinality"]
        field_view: FieldView | None = None
        async with self._uow(tenant, write=True) as uow:
            s = uow.session
            source = await resolve_object_type(
                s, tenant, values["from_object_type"], "relationship.from_object_type"
            )
            target = await resolve_object_type(
                s, tenant, values["to_object_type"], "relationship.to_object_type"
            )
            count = (
                await s.execute(
                    select(func.count()).where(custom_relationships.c.tenant_id == uuid.UUID(tenant))
                )
            ).scalar_one()
            if count >= rules.MAX_RELATIONSHIPS_PER_TENANT:
                raise ResourceExhausted(
                    f"a tenant has at most {rules.MAX_RELATIONSHIPS_PER_TENANT} relationships"
                )
            taken = (
                await s.execute(
                    select(custom_relationships.c.id).where(
                        custom_relationships.c.tenant_id == uuid.UUID(tenant),
                        custom_relationships.c.relationship_name == values["relationship_name"],
                    )
                )
            ).first()
            if taken is not None:
                raise AlreadyExists(f"a relationship named {values['relationship_name']!r} already exists")
            relationship_id = uuid.uuid4()
            holder: str | None = None
            required = bool(values.get("is_required", False))
            cascade = bool(values.get("cascade_delete", False))
            if kind == "master_detail":
                required, cascade = True, True
            if kind in ("lookup", "master_detail"):
                side = rules.reference_side(source.api_name, target.api_name, cardinality)
                holder = side.holder
                if holder in CORE_OBJECT_TYPES:
                    raise invalid(
                        "relationship.cardinality",
                        f"the reference would live on the core type {holder!r}; lookup and master_detail "
                        "references live on custom objects (use one_to_many / many_to_one to put it there, "
                        "or many_to_many)",
                    )
                field_view = await self._create_field(
                    tenant,
                    {
                        "object_type": holder,
                        "field_name": values.get("field_name") or values["relationship_name"],
                        "field_label": values.get("field_label")
                        or values["relationship_name"].replace("_", " ").title(),
                        "field_type": kind,
                        "is_required": required,
                        "is_unique": cardinality == "one_to_one",
                        "is_indexed": True,
                        "help_text": values.get("description", ""),
                    },
                    reference_to=side.target,
                    relationship_id=relationship_id,
                    session=s,
                )
            now, user = _now(), actor_id()
            row = {
                "id": relationship_id,
                "tenant_id": uuid.UUID(tenant),
                "relationship_name": values["relationship_name"],
                "from_object_type": source.api_name,
                "from_custom_object_id": source.object_id,
                "to_object_type": target.api_name,
                "to_custom_object_id": target.object_id,
                "relationship_type": kind,
                "cardinality": cardinality,
                "cascade_delete": cascade,
                "is_required": required,
                "description": values.get("description") or "",
                "holder_object_type": holder,
                "field_id": field_view.row["id"] if field_view is not None else None,
                "version": 1,
                "created_at": now,
                "updated_at": now,
                "created_by": user,
                "updated_by": user,
            }
            await s.execute(custom_relationships.insert().values(**row))
            await publish_definition_change(
                s, tenant=tenant, table="custom_relationships", record_id=relationship_id, operation="INSERT",
                old=None, new=row, version=1,
            )  # fmt: skip
            await uow.commit()
        if field_view is not None:
            await self._after_index_change(tenant, field_view.row, old=None)
        row["field_name"] = field_view.row["field_name"] if field_view is not None else ""
        return row

    async def list_relationships(self, object_type: str, page_size: int, page_token: str) -> Page:
        tenant = tenant_id()
        size = paging.page_size(page_size)
        fields = FieldSet(
            [Field("relationship_name", FieldType.STRING, custom_relationships.c.relationship_name)],
            custom_relationships.c.id,
        )
        keys = fields.order_by("relationship_name")
        fingerprint = paging.query_fingerprint("custom_relationships", object_type)
        cursor = paging.decode_token(page_token, fingerprint)
        base = [custom_relationships.c.tenant_id == uuid.UUID(tenant)]
        if object_type:
            base.append(
                or_(
                    custom_relationships.c.from_object_type == object_type,
                    custom_relationships.c.to_object_type == object_type,
                )
            )
        async with self._uow(tenant, write=False) as uow:
            total = (await uow.session.execute(select(func.count()).where(*base))).scalar_one()
            query = (
                select(custom_relationships, custom_fields.c.field_name)
                .outerjoin(custom_fields, custom_fields.c.id == custom_relationships.c.field_id)
                .where(*base)
                .order_by(*fields.order_clauses(keys))
                .limit(size + 1)
            )
            if cursor is not None:
                query = query.where(fields.after(keys, cursor))
            rows = [row_dict(r) for r in (await uow.session.execute(query)).all()]
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = paging.encode_token(fields.cursor_of(keys, rows[-1]), fingerprint)
        return Page(rows, token, total)

    async def delete_relationship(self, key: str) -> dict[str, Any]:
        tenant = tenant_id()
        if not key:
            raise invalid("id", "is required")
        field_id: uuid.UUID | None = None
        async with self._uow(tenant, write=True) as uow:
            s = uow.session
            old = await find_relationship(s, tenant, key)
            field_id = old["field_id"]
            if field_id is not None:
                loaded = await load_fields(s, tenant, "", field_ids=[field_id])
                if loaded:
                    await self._delete_field(s, tenant, loaded[0])
            # Many-to-many links go with the relationship (foreign key cascade).
            await s.execute(delete(custom_relationships).where(custom_relationships.c.id == old["id"]))
            await publish_definition_change(
                s, tenant=tenant, table="custom_relationships", record_id=old["id"], operation="DELETE",
                old=old, new=None, version=old["version"],
            )  # fmt: skip
            await uow.commit()
        if field_id is not None:
            await self._drop_indexes([field_id])
        return old

    # --- used by records ------------------------------------------------------------------

    def definitions_of(self, loaded: list[LoadedField]) -> list[FieldDefinition]:
        return [to_definition(f.row, f.options) for f in loaded]


async def find_relationship(s: AsyncSession, tenant: str, key: str) -> dict[str, Any]:
    """A relationship by id or name, with its reference field's name."""
    try:
        condition = custom_relationships.c.id == uuid.UUID(key)
    except ValueError:
        condition = custom_relationships.c.relationship_name == key
    row = (
        await s.execute(
            select(custom_relationships, custom_fields.c.field_name)
            .outerjoin(custom_fields, custom_fields.c.id == custom_relationships.c.field_id)
            .where(custom_relationships.c.tenant_id == uuid.UUID(tenant), condition)
        )
    ).first()
    if row is None:
        raise NotFound(f"no relationship {key[:100]!r}")
    return row_dict(row)


def _json_param(value: dict[str, Any]) -> Any:
    """A JSON object as a bound jsonb parameter, to merge into record_data with ||."""
    return bindparam(None, value, type_=JSONB)
