"""The internal data operations the audit service asks of custom-object (DataAdminService) for
custom object records (table `custom_object_records`, as the change events name it): restore a
record to an earlier state, retention purges and anonymisation, erasure of one person, counts.

Every write goes through the same helpers as the public record calls (validation, unique and
reference checks, the master-detail cascade) and publishes its change event through the outbox
in the same transaction, so it is audited like any other change.

Personal values, replaced by anonymisation and erasure, are the values of `email`, `phone`,
`text` and `textarea` fields (active or not). A value is removed, except in a required field,
which gets a placeholder ("Anonymized", or an `.invalid` address for e-mail fields; unique fields
get one made unique with the record id) when the placeholder passes the field's rules.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, delete, func, literal, or_, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from services.custom_object.adapters.indexes import json_text, typed_value
from services.custom_object.adapters.tables import (
    custom_fields,
    custom_object_records,
    custom_objects,
    custom_relationship_data,
    custom_relationships,
)
from services.custom_object.service_layer.common import (
    LoadedField,
    actor_id,
    as_uuid,
    load_fields,
    publish_record_change,
    require_active,
    row_dict,
    tenant_id,
    to_definition,
)
from services.custom_object.service_layer.records import FIELDS_PATH, RecordUseCases
from shared.errors import Aborted, FailedPrecondition, FieldViolation, InvalidArgument, invalid
from shared.fieldtypes import FieldDefinition, validate_values
from shared.logging import get_logger

log = get_logger(__name__)

#: The table custom records are published as (and the audit log knows them by).
RECORDS_TABLE = "custom_object_records"
#: Other names the audit service's owner table maps to this service for the same records.
TABLE_ALIASES = frozenset({RECORDS_TABLE, "custom_records"})
LINKS_TABLE = "custom_relationship_data"
MASKED = "***"
ANONYMIZED = "Anonymized"
#: Field types whose values describe a person.
PERSONAL_TYPES = frozenset({"email", "phone", "text", "textarea"})
#: Condition keys that select records by object rather than by a field value.
OBJECT_KEYS = ("object_type", "custom_object_id")
VALUES_PATH = "values_json.record_data"
CONDITIONS = "conditions_json"
#: Erasure counts are per object: "custom_object_records.<api_name>".
COUNT_PREFIX = RECORDS_TABLE + "."


@dataclass
class Erasure:
    counts: Counter[str] = field(default_factory=Counter)
    records: list[tuple[str, str]] = field(default_factory=list)


def check_table(table_name: str) -> None:
    if table_name not in TABLE_ALIASES:
        raise invalid(
            "table_name",
            f"the custom-object service administers {RECORDS_TABLE} (records of custom objects) only",
        )


def _json_object(text: str, path: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise invalid(path, "must be a JSON object") from exc
    if not isinstance(value, dict):
        raise invalid(path, "must be a JSON object")
    return value


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _lenient(definition: FieldDefinition) -> FieldDefinition:
    """A definition that accepts any value of the field's type, for matching conditions against
    what is stored (inactive fields and options, values from before a rule changed)."""
    return dataclasses.replace(
        definition,
        is_active=True,
        required=False,
        options=tuple(dataclasses.replace(o, is_active=True) for o in definition.options),
    )


def _placeholder(loaded: LoadedField, record_id: uuid.UUID) -> Any:
    """What a required personal field holds after anonymisation, or None to remove the value."""
    row = loaded.row
    if not row["is_required"]:
        return None
    suffix = record_id.hex[:12]
    candidates = {
        "email": f"anonymized.{suffix}@anonymized.invalid",
        "phone": "0000000000",
        "text": f"{ANONYMIZED} {suffix}" if row["is_unique"] else ANONYMIZED,
        "textarea": ANONYMIZED,
    }
    candidate = candidates.get(row["field_type"])
    definition = dataclasses.replace(loaded.definition, is_active=True)
    if (
        candidate is None
        or not validate_values({row["field_name"]: candidate}, [definition], partial=True).ok
    ):
        return None
    return candidate


def anonymized_data(
    data: Mapping[str, Any], fields: Sequence[LoadedField], record_id: uuid.UUID, clear: Sequence[str] = ()
) -> dict[str, Any]:
    """The record's values with personal values replaced and the `clear` fields removed."""
    result = {k: v for k, v in data.items() if k not in clear}
    for loaded in fields:
        name = loaded.row["field_name"]
        if loaded.row["field_type"] not in PERSONAL_TYPES or result.get(name) is None:
            continue
        replacement = _placeholder(loaded, record_id)
        if replacement is None:
            result.pop(name, None)
        else:
            result[name] = replacement
    return result


class DataAdmin(RecordUseCases):
    """DataAdminService for custom object records; shares RecordUseCases' checks and cascade."""

    # --- restore ----------------------------------------------------------------------------

    async def restore(
        self, table_name: str, record_id: uuid.UUID, values_json: str, expected_version: int, force: bool
    ) -> int:
        """Writes an earlier state back (or re-creates a deleted record) as a RESTORE change.

        Validated as UpdateRecord validates a full replacement, with these differences: masked
        values ("***") and values of inactive fields keep what the record holds now, values of
        fields deleted since are dropped, and id, tenant, version and timestamps are the
        service's own."""
        check_table(table_name)
        tenant = tenant_id()
        given = _json_object(values_json, "values_json")
        data = given.get("record_data")
        if not isinstance(data, dict):
            raise invalid(VALUES_PATH, "is required (a JSON object of field values)")
        async with self._uow(tenant, write=True) as uow:
            s = uow.session
            found = (
                await s.execute(
                    select(custom_object_records)
                    .where(
                        custom_object_records.c.tenant_id == uuid.UUID(tenant),
                        custom_object_records.c.id == record_id,
                    )
                    .with_for_update()
                )
            ).first()
            current = row_dict(found) if found is not None else None
            if current is not None and expected_version and not force:
                if current["version"] != expected_version:
                    raise Aborted(
                        f"record {record_id} is at version {current['version']}, not {expected_version}; "
                        "restore with force to overwrite it"
                    )
            if current is not None:
                object_id = current["custom_object_id"]
            else:
                object_id = as_uuid(str(given.get("custom_object_id") or ""))
                if object_id is None:
                    raise invalid("values_json.custom_object_id", "must be the record's custom object id")
            obj = (
                await s.execute(
                    select(custom_objects).where(
                        custom_objects.c.tenant_id == uuid.UUID(tenant), custom_objects.c.id == object_id
                    )
                )
            ).first()
            if obj is None:
                raise FailedPrecondition(f"the record's custom object {object_id} no longer exists")
            custom_object = row_dict(obj)
            require_active(custom_object)
            fields = await load_fields(s, tenant, custom_object["api_name"])
            await self._ensure_indexes(s, fields)
            by_name = {f.row["field_name"]: f for f in fields}
            now_data: dict[str, Any] = dict(current["record_data"]) if current is not None else {}
            wanted: dict[str, Any] = {}
            kept: dict[str, Any] = {}
            for name, value in data.items():
                loaded = by_name.get(name)
                if loaded is None:
                    continue  # the field was deleted since; its values went with it
                if not loaded.row["is_active"]:
                    continue
                if value == MASKED:
                    if name in now_data:
                        wanted[name] = now_data[name]
                    continue
                wanted[name] = value
            for name, value in now_data.items():
                loaded = by_name.get(name)
                if loaded is not None and not loaded.row["is_active"]:
                    kept[name] = value
            definitions = [to_definition(f.row, f.options) for f in fields]
            new_data = validate_values(wanted, definitions, prefix=VALUES_PATH).raise_for_violations()
            new_data.update(kept)
            self._check_size(new_data)
            await self._check_unique(s, tenant, object_id, fields, new_data, record_id)
            references = {k: v for k, v in new_data.items() if now_data.get(k) != v}
            try:
                await self._check_references(s, tenant, fields, references)
            except InvalidArgument as exc:
                raise InvalidArgument(
                    FieldViolation(v.field.replace(FIELDS_PATH, VALUES_PATH, 1), v.description)
                    for v in exc.violations
                ) from exc
            now, user = _now(), actor_id()
            if current is not None:
                version = int(current["version"]) + 1
                new = {**current, "record_data": new_data, "version": version, "updated_at": now,
                       "updated_by": user}  # fmt: skip
                await s.execute(
                    update(custom_object_records)
                    .where(
                        custom_object_records.c.tenant_id == uuid.UUID(tenant),
                        custom_object_records.c.id == record_id,
                    )
                    .values(record_data=new_data, version=version, updated_at=now, updated_by=user)
                )
            else:
                # Numbered after the versions the record had, so its history stays ordered.
                earlier = given.get("version")
                earlier_version = (
                    earlier
                    if isinstance(earlier, int) and not isinstance(earlier, bool) and 0 < earlier < 2**62
                    else 0
                )
                version = max(expected_version, earlier_version, 0) + 1
                new = {
                    "id": record_id,
                    "tenant_id": uuid.UUID(tenant),
                    "custom_object_id": object_id,
                    "record_data": new_data,
                    "version": version,
                    "created_at": now,
                    "updated_at": now,
                    "created_by": user,
                    "updated_by": user,
                }
                await s.execute(custom_object_records.insert().values(**new))
            await publish_record_change(
                s, tenant=tenant, table=RECORDS_TABLE, record_id=record_id, operation="RESTORE",
                old=current, new=new, version=version,
            )  # fmt: skip
            await uow.commit()
        self._touch(tenant, fields, new_data)
        return version

    # --- retention ----------------------------------------------------------------------------

    async def _object_fields(
        self, s: AsyncSession, tenant: str, object_ids: Sequence[uuid.UUID] | None = None
    ) -> dict[uuid.UUID, tuple[dict[str, Any], list[LoadedField]]]:
        """The tenant's custom objects (or the given ones) with their fields."""
        query = select(custom_objects).where(custom_objects.c.tenant_id == uuid.UUID(tenant))
        if object_ids is not None:
            query = query.where(custom_objects.c.id.in_(list(object_ids)))
        objects = {r.id: row_dict(r) for r in (await s.execute(query)).all()}
        result: dict[uuid.UUID, tuple[dict[str, Any], list[LoadedField]]] = {}
        for object_id, row in objects.items():
            result[object_id] = (row, await load_fields(s, tenant, row["api_name"]))
        return result

    async def _selection(
        self, s: AsyncSession, tenant: str, older_than: dt.datetime | None, conditions_json: str
    ) -> tuple[Any, dict[uuid.UUID, tuple[dict[str, Any], list[LoadedField]]]]:
        """The condition selecting the records of a retention run, and the objects in scope.

        Conditions are equality on record fields (compared by the field's type, so 1500.5
        matches the stored "1500.50"; null matches an empty field) across every custom object
        that has all the named fields, plus `object_type` (an api_name) or `custom_object_id` to
        name one object. A field no object in scope has, or a value that fits none of them, is
        INVALID_ARGUMENT on conditions_json."""
        given = _json_object(conditions_json, CONDITIONS)
        objects = await self._object_fields(s, tenant)
        scope = list(objects)
        for key in OBJECT_KEYS:
            if key not in given:
                continue
            wanted = given.pop(key)
            scope = [
                i
                for i in scope
                if isinstance(wanted, str)
                and (objects[i][0]["api_name"] == wanted if key == "object_type" else str(i) == wanted)
            ]
            if not scope:
                raise invalid(
                    CONDITIONS, f"{key} {str(wanted)[:100]!r} names no custom object of this tenant"
                )
        per_object = []
        fitted: dict[str, bool] = {name: False for name in given}
        known: set[str] = set()
        c = custom_object_records.c
        for object_id in scope:
            by_name = {f.row["field_name"]: f for f in objects[object_id][1]}
            known.update(name for name in given if name in by_name)
            parts = [c.custom_object_id == object_id]
            for name, value in given.items():
                loaded = by_name.get(name)
                if loaded is None:
                    parts = []
                    break
                if value is None:
                    fitted[name] = True
                    parts.append(func.coalesce(func.jsonb_typeof(c.record_data[name]), "null") == "null")
                    continue
                checked = validate_values({name: value}, [_lenient(loaded.definition)], partial=True)
                if not checked.ok:
                    parts = []
                    break
                fitted[name] = True
                parts.append(c.record_data[name] == literal(checked.values[name], JSONB))
            if parts:
                per_object.append(and_(*parts))
        unknown = sorted(set(given) - known)
        if unknown:
            raise InvalidArgument(
                [
                    FieldViolation(CONDITIONS, f"{n[:100]!r} is not a field of a custom object")
                    for n in unknown
                ]
            )
        misfits = sorted(n for n, ok in fitted.items() if not ok)
        if misfits:
            raise InvalidArgument(
                [
                    FieldViolation(CONDITIONS, f"the value for {n!r} fits no field of that name")
                    for n in misfits
                ]
            )
        if not given:
            per_object = [c.custom_object_id.in_(scope)] if scope else []
        where = [c.tenant_id == uuid.UUID(tenant), or_(*per_object) if per_object else c.id.is_(None)]
        if older_than is not None:
            where.append(c.updated_at < older_than)
        return and_(*where), {i: objects[i] for i in scope}

    async def purge(
        self, table_name: str, older_than: dt.datetime | None, conditions_json: str, hard: bool
    ) -> list[str]:
        """Deletes the selected records as DeleteRecord does (master-detail children and
        cascading lookups go too, other lookups to them are cleared, links removed). A record
        that a required, non-cascading lookup holds on to is skipped, as DeleteRecord refuses
        it; the rest of the run goes on. Custom records have no soft delete."""
        check_table(table_name)
        if not hard:
            raise invalid("method", "custom object records have no soft delete; use a hard delete")
        tenant = tenant_id()
        removed: list[str] = []
        async with self._uow(tenant, write=True) as uow:
            s = uow.session
            where, objects = await self._selection(s, tenant, older_than, conditions_json)
            roots = [
                row_dict(r)
                for r in (
                    await s.execute(
                        select(custom_object_records).where(where).order_by(custom_object_records.c.id)
                    )
                ).all()
            ]
            gone: set[uuid.UUID] = set()
            for root in roots:
                if root["id"] in gone:
                    continue
                api_name = objects[root["custom_object_id"]][0]["api_name"]
                try:
                    doomed, to_clear = await self._cascade_plan(
                        s, tenant, root["id"], api_name, blocking=True
                    )
                except FailedPrecondition as exc:
                    log.info("retention skipped a record", record_id=str(root["id"]), reason=exc.message)
                    continue
                doomed = [r for r in doomed if r["id"] not in gone]
                await self._apply_delete(s, tenant, root["id"], [root, *doomed], to_clear)
                for record in [root, *doomed]:
                    gone.add(record["id"])
                    removed.append(str(record["id"]))
            await uow.commit()
        return removed

    async def _anonymize_rows(
        self,
        s: AsyncSession,
        tenant: str,
        rows: Sequence[Mapping[str, Any]],
        fields_of: Mapping[uuid.UUID, list[LoadedField]],
        clear: Mapping[uuid.UUID, set[str]] | None = None,
    ) -> list[dict[str, Any]]:
        """Replaces the rows' personal values (and removes the `clear` references); publishes an
        UPDATE per changed record. Returns the changed rows."""
        changed = []
        for old in rows:
            record_id = old["id"]
            data = anonymized_data(
                old["record_data"], fields_of[old["custom_object_id"]], record_id,
                sorted((clear or {}).get(record_id, set())),
            )  # fmt: skip
            if data == old["record_data"]:
                continue
            new = {**old, "record_data": data, "version": old["version"] + 1, "updated_at": _now(),
                   "updated_by": actor_id()}  # fmt: skip
            await s.execute(
                update(custom_object_records)
                .where(
                    custom_object_records.c.tenant_id == uuid.UUID(tenant),
                    custom_object_records.c.id == record_id,
                )
                .values(record_data=data, version=new["version"], updated_at=new["updated_at"],
                        updated_by=new["updated_by"])
            )  # fmt: skip
            await publish_record_change(
                s, tenant=tenant, table=RECORDS_TABLE, record_id=record_id, operation="UPDATE",
                old=old, new=new, version=new["version"],
            )  # fmt: skip
            changed.append(new)
        return changed

    async def anonymize(
        self, table_name: str, older_than: dt.datetime | None, conditions_json: str
    ) -> list[str]:
        check_table(table_name)
        tenant = tenant_id()
        async with self._uow(tenant, write=True) as uow:
            s = uow.session
            where, objects = await self._selection(s, tenant, older_than, conditions_json)
            rows = [
                row_dict(r)
                for r in (
                    await s.execute(
                        select(custom_object_records)
                        .where(where)
                        .order_by(custom_object_records.c.id)
                        .with_for_update()
                    )
                ).all()
            ]
            changed = await self._anonymize_rows(s, tenant, rows, {i: f for i, (_, f) in objects.items()})
            await uow.commit()
        return [str(r["id"]) for r in changed]

    # --- erasure --------------------------------------------------------------------------------

    async def erase_subject(
        self, email: str, contact_id: uuid.UUID | None, lead_id: uuid.UUID | None
    ) -> Erasure:
        """Everything custom records hold about one person:

        - records whose master_detail (or cascading lookup) reference points at the contact or
          lead are details of the person and are deleted, with their own cascade (other lookups
          to them are cleared, even required ones: the erasure cannot be refused);
        - records whose other lookup points at them have that reference removed and their
          personal values anonymized (the record itself is about something else);
        - records with the e-mail address (case-insensitive) in an email field have their
          personal values anonymized;
        - many-to-many links to the contact or lead are removed.

        The e-mail address alone finds no references: the contacts and leads with that address
        live in the core-entity service, which the caller asks with their ids."""
        if not (email or contact_id or lead_id):
            raise invalid("email", "give an e-mail address, a contact id or a lead id")
        tenant = tenant_id()
        people = {t: i for t, i in (("contact", contact_id), ("lead", lead_id)) if i is not None}
        erasure = Erasure()
        c = custom_object_records.c
        async with self._uow(tenant, write=True) as uow:
            s = uow.session
            objects = await self._object_fields(s, tenant)
            api_names = {i: row["api_name"] for i, (row, _) in objects.items()}
            fields_of = {i: f for i, (_, f) in objects.items()}
            cascading = await self._cascading_fields(s, tenant)
            roots: dict[uuid.UUID, dict[str, Any]] = {}
            holders: dict[uuid.UUID, dict[str, Any]] = {}
            clear: dict[uuid.UUID, set[str]] = {}
            for object_id, fields in fields_of.items():
                for loaded in fields:
                    row = loaded.row
                    name, kind = row["field_name"], row["field_type"]
                    target = people.get(row["reference_object_type"] or "")
                    if kind in ("lookup", "master_detail") and target is not None:
                        condition = typed_value(name, "lookup") == str(target)  # uses its index
                    elif kind == "email" and email:
                        condition = func.lower(json_text(name)) == email.lower()
                    else:
                        continue
                    found = (
                        await s.execute(
                            select(custom_object_records)
                            .where(
                                c.tenant_id == uuid.UUID(tenant), c.custom_object_id == object_id, condition
                            )
                            .with_for_update()
                        )
                    ).all()
                    for hit in found:
                        if kind == "email":
                            holders.setdefault(hit.id, row_dict(hit))
                        elif kind == "master_detail" or row["id"] in cascading:
                            roots[hit.id] = row_dict(hit)
                        else:
                            holders.setdefault(hit.id, row_dict(hit))
                            clear.setdefault(hit.id, set()).add(name)
            gone: set[uuid.UUID] = set()
            for root_id, root in sorted(roots.items(), key=lambda item: str(item[0])):
                if root_id in gone:
                    continue
                doomed, to_clear = await self._cascade_plan(
                    s, tenant, root_id, api_names[root["custom_object_id"]], blocking=False
                )
                doomed = [r for r in doomed if r["id"] not in gone]
                await self._apply_delete(s, tenant, root_id, [root, *doomed], to_clear)
                for record in [root, *doomed]:
                    gone.add(record["id"])
                    erasure.counts[COUNT_PREFIX + api_names[record["custom_object_id"]]] += 1
                    erasure.records.append((RECORDS_TABLE, str(record["id"])))
            # Reload: the cascade may have cleared references on these holders meanwhile.
            remaining = [i for i in holders if i not in gone]
            fresh = [
                row_dict(r)
                for r in (
                    await s.execute(
                        select(custom_object_records).where(
                            c.tenant_id == uuid.UUID(tenant), c.id.in_(remaining)
                        )
                    )
                ).all()
            ]
            await self._anonymize_rows(s, tenant, fresh, fields_of, clear)
            for record in fresh:
                # Counted even when nothing was left to change (a second run): they were looked at.
                erasure.counts[COUNT_PREFIX + api_names[record["custom_object_id"]]] += 1
                erasure.records.append((RECORDS_TABLE, str(record["id"])))
            links = await self._remove_links(s, tenant, list(people.values()))
            if links:
                erasure.counts[LINKS_TABLE] += len(links)
                erasure.records += [(LINKS_TABLE, str(link["id"])) for link in links]
            await uow.commit()
        return erasure

    async def _cascading_fields(self, s: AsyncSession, tenant: str) -> set[uuid.UUID]:
        """Ids of the reference fields whose relationship deletes their holders."""
        rows = (
            await s.execute(
                select(custom_fields.c.id)
                .join(custom_relationships, custom_relationships.c.id == custom_fields.c.relationship_id)
                .where(custom_fields.c.tenant_id == uuid.UUID(tenant), custom_relationships.c.cascade_delete)
            )
        ).all()
        return {r.id for r in rows}

    async def _remove_links(
        self, s: AsyncSession, tenant: str, record_ids: list[uuid.UUID]
    ) -> list[dict[str, Any]]:
        if not record_ids:
            return []
        links = custom_relationship_data.c
        removed = [
            row_dict(r)
            for r in (
                await s.execute(
                    delete(custom_relationship_data)
                    .where(
                        links.tenant_id == uuid.UUID(tenant),
                        or_(links.from_record_id.in_(record_ids), links.to_record_id.in_(record_ids)),
                    )
                    .returning(*custom_relationship_data.c)
                )
            ).all()
        ]
        for link in removed:
            await publish_record_change(
                s, tenant=tenant, table=LINKS_TABLE, record_id=link["id"], operation="DELETE",
                old=link, new=None, version=1,
            )  # fmt: skip
        return removed

    # --- counts ---------------------------------------------------------------------------------

    async def count(self, table_name: str) -> int:
        check_table(table_name)
        tenant = tenant_id()
        async with self._uow(tenant, write=False) as uow:
            counted = await uow.session.execute(
                select(func.count())
                .select_from(custom_object_records)
                .where(custom_object_records.c.tenant_id == uuid.UUID(tenant))
            )
            return int(counted.scalar_one())
