"""Use cases of the core-entity service: the standard methods of every resource with the data
model's rules, soft delete and undelete, lead conversion, deal stage moves, the account
hierarchy, pipelines with their stages, and the tenant's currencies.

Every use case runs in one `UnitOfWork` of the caller's tenant. Rules are checked in this
order, so a caller learns the most useful thing first: unparsable or rule-breaking fields
(INVALID_ARGUMENT, all at once), then references (NOT_FOUND: another tenant's record is simply
absent, so nothing is revealed), then business preconditions (FAILED_PRECONDITION), uniqueness
(ALREADY_EXISTS) and etags (ABORTED).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from sqlalchemy import and_, delete, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.core_entity.adapters import repository as repo
from services.core_entity.adapters import tables
from services.core_entity.adapters.repository import Row, Tx
from services.core_entity.domain import model, rules
from services.core_entity.domain.model import EntitySpec
from services.core_entity.service_layer.custom_fields import CustomFields
from services.core_entity.service_layer.listing import ListQuery, ListResult, list_rows
from shared.context import current_call
from shared.db import UnitOfWork
from shared.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)

DEFAULT_CURRENCIES = ("USD",)
MAX_HIERARCHY_DEPTH = 50


#: The partial unique index on (tenant_id, lower(email)) of live contacts (migration 0002).
CONTACT_EMAIL_INDEX = "idx_contacts_email_tenant"
DUPLICATE_EMAIL = "another contact already has this e-mail address"


class RuleViolation(FailedPrecondition):
    """A business precondition broken by one field, with a `PreconditionFailure` naming it."""

    def __init__(self, field: str, kind: str, message: str) -> None:
        super().__init__(f"{field}: {message}", reason=kind)
        self.field = field
        self.kind = kind

    def details(self) -> list[any_pb2.Any]:
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=self.kind, subject=self.field, description=self.message
                )
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(failure)
        return [packed, *super().details()]


def not_found(spec: EntitySpec, record_id: Any, field: str | None = None) -> NotFound:
    where = f"{field}: " if field else ""
    return NotFound(f"{where}{spec.name} {record_id} not found")


def check_etag(version: int | None, row: Row, spec: EntitySpec) -> None:
    if version is not None and version != row["version"]:
        raise Aborted(
            f'{spec.name} {row["id"]} changed since it was read (etag W/"{version}", now '
            f'W/"{row["version"]}"); read it again and retry',
            reason="STALE_ETAG",
        )


def raise_if(violations: Sequence[FieldViolation]) -> None:
    if violations:
        raise InvalidArgument(violations)


def validate(
    spec: EntitySpec, record: Mapping[str, Any], prefix: str, creating: bool
) -> list[FieldViolation]:
    if spec is model.ACTIVITY:
        return rules.validate_activity(record, prefix, creating=creating)
    return rules.VALIDATORS[spec.table](record, prefix)


def _changed(old: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k in old and old[k] != v}


@dataclass
class PipelineView:
    pipeline: Row
    stages: list[Row] = field(default_factory=list)


@dataclass
class Conversion:
    lead: Row
    contact: Row
    account: Row
    deal: Row | None


@dataclass
class Hierarchy:
    account: Row
    ancestors: list[tuple[Row, int]]
    descendants: list[tuple[Row, int]]


MembershipGuard = Any  # async (session, tenant_id, is_write) -> None


class CoreEntities:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        custom_fields: CustomFields,
        *,
        retention_days: int = 30,
        guard: MembershipGuard | None = None,
    ) -> None:
        self._sessions = sessions
        self.custom_fields = custom_fields
        self._retention = dt.timedelta(days=retention_days)
        self._guard = guard

    # --- plumbing ----------------------------------------------------------------------------

    @staticmethod
    def tenant() -> str:
        tenant_id = current_call().tenant_id
        if not tenant_id:
            raise PermissionDenied("core-entity calls act for a tenant; none was given")
        return tenant_id

    @contextlib.asynccontextmanager
    async def transaction(self, *, write: bool) -> AsyncIterator[tuple[UnitOfWork, Tx]]:
        tenant_id = self.tenant()
        call = current_call()
        try:
            actor = uuid.UUID(call.user_id) if call.user_id else repo.SYSTEM_ACTOR
        except ValueError:
            actor = repo.SYSTEM_ACTOR
        async with UnitOfWork(self._sessions, tenant_id) as uow:
            if self._guard is not None:
                await self._guard(uow.session, tenant_id, write)
            yield uow, Tx(uow.session, uuid.UUID(tenant_id), actor, dt.datetime.now(dt.UTC), uow.conn)

    async def custom_types(self, spec: EntitySpec) -> dict[str, str]:
        """Field types for rendering and filtering. Reads degrade rather than fail while the
        custom-object service is down: values are then typed by their JSON form."""
        if not spec.has_custom_fields:
            return {}
        try:
            return await self.custom_fields.types(self.tenant(), spec.name)
        except Unavailable:
            return {}

    # --- generic standard methods ------------------------------------------------------------

    async def create(self, spec: EntitySpec, values: dict[str, Any], violations: list[FieldViolation]) -> Row:
        async with self.transaction(write=True) as (uow, tx):
            row = await self.create_in(tx, spec, values, violations, spec.name)
            await uow.commit()
        return row

    async def create_in(
        self,
        tx: Tx,
        spec: EntitySpec,
        values: Mapping[str, Any],
        violations: list[FieldViolation],
        prefix: str,
    ) -> Row:
        """Checks and inserts one record inside an open transaction."""
        record: dict[str, Any] = {k: v for k, v in values.items() if v is not None}
        for column, default in spec.defaults.items():
            record.setdefault(column, default)
        violations = [*violations, *validate(spec, record, prefix, creating=True)]
        if spec.has_custom_fields:
            cleaned, bad = await self.custom_fields.clean(
                str(tx.tenant_id),
                spec.name,
                record.get("custom_fields") or {},
                None,
                f"{prefix}.custom_fields",
            )
            record["custom_fields"] = cleaned
            violations += bad
        raise_if(violations)
        # A new contact's e-mail is left to the unique index: one statement fewer per create.
        await self.check(tx, spec, record, None, prefix, check_email=False)
        try:
            return await repo.insert_row(tx, spec, record)
        except repo.UniqueViolation as exc:
            if exc.constraint == CONTACT_EMAIL_INDEX:
                raise AlreadyExists(f"{prefix}.email: {DUPLICATE_EMAIL}") from exc
            raise

    async def get(self, spec: EntitySpec, record_id: uuid.UUID) -> Row:
        async with self.transaction(write=False) as (_, tx):
            row = await repo.load(tx, spec, record_id)
        if row is None:
            raise not_found(spec, record_id)
        return row

    async def list_records(self, spec: EntitySpec, query: ListQuery) -> ListResult:
        types = await self.custom_types(spec)
        async with self.transaction(write=False) as (_, tx):
            return await list_rows(tx, spec, query, types)

    async def update(
        self,
        spec: EntitySpec,
        record_id: uuid.UUID,
        values: dict[str, Any],
        violations: list[FieldViolation],
        etag_version: int | None,
    ) -> Row:
        raise_if(violations)
        async with self.transaction(write=True) as (uow, tx):
            old = await repo.load(tx, spec, record_id, for_update=True)
            if old is None:
                raise not_found(spec, record_id)
            check_etag(etag_version, old, spec)
            row = await self.update_in(tx, spec, old, values, spec.name)
            await uow.commit()
        return row

    async def update_in(
        self, tx: Tx, spec: EntitySpec, old: Row, values: Mapping[str, Any], prefix: str
    ) -> Row:
        record = dict(old)
        patch = values.get("custom_fields.patch")
        record.update({k: v for k, v in values.items() if k != "custom_fields.patch"})
        for column, default in spec.defaults.items():
            # Clearing a defaulted column (e.g. account_type) restores its default.
            if column in values and values[column] is None:
                record[column] = default
        violations = validate(spec, record, prefix, creating=False)
        if spec.has_custom_fields and ("custom_fields" in values or patch is not None):
            given = patch if patch is not None else values.get("custom_fields") or {}
            stored = old["custom_fields"] if patch is not None else {}
            if patch is None:
                # A whole-map update replaces it: keys not given are removed.
                given = {**{k: None for k in old["custom_fields"] if k not in given}, **given}
                stored = old["custom_fields"]
            cleaned, bad = await self.custom_fields.clean(
                str(tx.tenant_id), spec.name, given, stored, f"{prefix}.custom_fields"
            )
            record["custom_fields"] = cleaned
            violations += bad
        raise_if(violations)
        await self.check(tx, spec, record, old, prefix)
        changes = _changed(old, record)
        if not changes:
            return old
        return await repo.update_row(tx, spec, old, changes)

    async def delete(self, spec: EntitySpec, record_id: uuid.UUID, etag_version: int | None) -> Row:
        async with self.transaction(write=True) as (uow, tx):
            old = await repo.load(tx, spec, record_id, for_update=True)
            if old is None:
                raise not_found(spec, record_id)
            check_etag(etag_version, old, spec)
            if spec is model.PIPELINE:
                deals = await repo.count(
                    tx,
                    model.DEAL,
                    and_(tables.deals.c.pipeline_id == record_id, tables.deals.c.deleted_at.is_(None)),
                )
                if deals:
                    raise RuleViolation(
                        "id", "PIPELINE_IN_USE", f"{deals} live deal(s) use this pipeline; move them first"
                    )
            await repo.soft_delete_cascade(tx, spec, [record_id])
            row = await repo.update_row(tx, spec, old, {"deleted_at": tx.now}, operation="DELETE")
            await uow.commit()
        return row

    async def undelete(self, spec: EntitySpec, record_id: uuid.UUID) -> Row:
        async with self.transaction(write=True) as (uow, tx):
            old = await repo.load(tx, spec, record_id, for_update=True, include_deleted=True)
            if old is None or (
                old["deleted_at"] is not None and old["deleted_at"] < tx.now - self._retention
            ):
                raise not_found(spec, record_id)
            if old["deleted_at"] is None:
                raise RuleViolation("id", "NOT_DELETED", f"{spec.name} {record_id} is not deleted")
            await repo.undelete_cascade(tx, spec, [record_id], old["deleted_at"])
            row = await repo.update_row(tx, spec, old, {"deleted_at": None}, operation="RESTORE")
            await uow.commit()
        return row

    # --- cross-entity checks -----------------------------------------------------------------

    async def _require(self, tx: Tx, spec: EntitySpec, record_id: Any, field: str) -> None:
        if record_id is not None and not await repo.exists(tx, spec, record_id):
            raise not_found(spec, record_id, field)

    async def check(
        self,
        tx: Tx,
        spec: EntitySpec,
        record: dict[str, Any],
        old: Row | None,
        prefix: str,
        *,
        check_email: bool = True,
    ) -> None:
        """The rules that need the database; may also fill values derived from other rows.
        Creates leave e-mail uniqueness to the unique index and imports check it for a whole
        batch at once (`existing_emails`); updates check it here."""

        def moved(column: str) -> bool:
            return record.get(column) is not None and (old is None or old.get(column) != record.get(column))

        if spec.has_custom_fields:
            await self._refuse_duplicate_custom_values(tx, spec, record, old, prefix)
        if spec is model.ACCOUNT:
            if moved("parent_account_id"):
                await self._require(
                    tx, model.ACCOUNT, record["parent_account_id"], f"{prefix}.parent_account_id"
                )
                if old is not None:
                    await self._refuse_cycle(tx, old["id"], record["parent_account_id"], prefix)
        elif spec is model.CONTACT:
            if moved("account_id"):
                await self._require(tx, model.ACCOUNT, record["account_id"], f"{prefix}.account_id")
            email = record.get("email")
            if check_email and email and (old is None or (old.get("email") or "").lower() != email.lower()):
                await self._refuse_duplicate_email(tx, email, record.get("id"), prefix)
        elif spec is model.DEAL:
            await self._check_deal(tx, record, old, prefix)
        elif spec is model.ACTIVITY:
            for column, target in (
                ("account_id", model.ACCOUNT),
                ("contact_id", model.CONTACT),
                ("lead_id", model.LEAD),
                ("deal_id", model.DEAL),
            ):
                if moved(column):
                    await self._require(tx, target, record[column], f"{prefix}.{column}")
            if record.get("assigned_to") is None:
                record["assigned_to"] = tx.actor
        elif spec is model.PIPELINE:
            if record.get("is_default") and (old is None or not old["is_default"]):
                await self._refuse_second_default(tx, prefix)

    async def _refuse_duplicate_custom_values(
        self, tx: Tx, spec: EntitySpec, record: Mapping[str, Any], old: Row | None, prefix: str
    ) -> None:
        """`is_unique` custom fields: no other live record of the tenant has the same value.
        Checked in the writing transaction under a lock per field, so two concurrent writers of
        the same value take turns and the second one sees the first."""
        values = record.get("custom_fields") or {}
        table = repo.table_of(spec)
        for definition in await self.custom_fields.definitions(str(tx.tenant_id), spec.name):
            value = values.get(definition.name)
            if not definition.unique or not definition.is_active or value is None:
                continue
            if old is not None and (old.get("custom_fields") or {}).get(definition.name) == value:
                continue
            await tx.session.execute(
                text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
                {"key": f"core.unique:{tx.tenant_id}:{spec.table}:{definition.name}"},
            )
            stmt = select(table.c.id).where(
                table.c.tenant_id == tx.tenant_id,
                table.c.deleted_at.is_(None),
                table.c.custom_fields.contains({definition.name: value}),
            )
            if record.get("id") is not None:
                stmt = stmt.where(table.c.id != record["id"])
            if (await tx.session.execute(stmt.limit(1))).first() is not None:
                path = f"{prefix}.custom_fields.{definition.name}"
                raise AlreadyExists(f"{path}: another {spec.name} already has this value (unique)")

    async def _refuse_cycle(self, tx: Tx, account_id: uuid.UUID, new_parent: uuid.UUID, prefix: str) -> None:
        # Two concurrent re-parentings could each pass the check and together form a cycle;
        # one lock per tenant's hierarchy makes them take turns.
        await tx.session.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended('core.accounts.hierarchy:' || :t, 0))"),
            {"t": str(tx.tenant_id)},
        )
        cycle = await tx.session.scalar(
            text(
                """WITH RECURSIVE up(id, parent_account_id) AS (
                       SELECT id, parent_account_id FROM core.accounts WHERE tenant_id = :t AND id = :parent
                       UNION
                       SELECT a.id, a.parent_account_id FROM core.accounts a
                       JOIN up ON a.id = up.parent_account_id WHERE a.tenant_id = :t
                   )
                   SELECT EXISTS (SELECT 1 FROM up WHERE id = :self)"""
            ),
            {"t": tx.tenant_id, "parent": new_parent, "self": account_id},
        )
        if cycle:
            raise RuleViolation(
                f"{prefix}.parent_account_id",
                "PARENT_CYCLE",
                "the new parent is the account itself or one of its descendants; that would make a cycle",
            )

    async def _refuse_duplicate_email(self, tx: Tx, email: str, own_id: Any, prefix: str) -> None:
        c = tables.contacts.c
        # `email IS NOT NULL` matches the partial unique index's predicate, so it can be used.
        stmt = select(c.id).where(
            c.tenant_id == tx.tenant_id,
            c.email.is_not(None),
            func.lower(c.email) == email.lower(),
            c.deleted_at.is_(None),
        )
        if own_id is not None:
            stmt = stmt.where(c.id != own_id)
        if (await tx.session.execute(stmt.limit(1))).first() is not None:
            raise AlreadyExists(f"{prefix}.email: {DUPLICATE_EMAIL}")

    async def existing_emails(self, tx: Tx, emails: list[str]) -> set[str]:
        """Which of these (lower-cased) e-mail addresses live contacts already use: one query for
        an import batch instead of one per row, which made large imports quadratic."""
        if not emails:
            return set()
        c = tables.contacts.c
        found = await tx.session.scalars(
            select(func.lower(c.email)).where(
                c.tenant_id == tx.tenant_id,
                c.email.is_not(None),
                c.deleted_at.is_(None),
                func.lower(c.email).in_(emails),
            )
        )
        return set(found)

    async def _refuse_second_default(self, tx: Tx, prefix: str) -> None:
        p = tables.pipelines.c
        found = await tx.session.scalar(
            select(p.id).where(p.tenant_id == tx.tenant_id, p.is_default, p.deleted_at.is_(None)).limit(1)
        )
        if found is not None:
            raise AlreadyExists(
                f"{prefix}.is_default: the tenant already has a default pipeline ({found}); "
                "unset it there first"
            )

    async def supported_currencies(self, tx: Tx) -> list[str]:
        c = tables.tenant_currencies.c
        codes = [
            r[0]
            for r in await tx.session.execute(
                select(c.currency_code).where(c.tenant_id == tx.tenant_id).order_by(c.currency_code)
            )
        ]
        return codes or list(DEFAULT_CURRENCIES)

    async def _check_deal(self, tx: Tx, record: dict[str, Any], old: Row | None, prefix: str) -> None:
        p, s = tables.pipelines.c, tables.pipeline_stages.c
        if record.get("pipeline_id") is None:
            record["pipeline_id"] = await tx.session.scalar(
                select(p.id).where(p.tenant_id == tx.tenant_id, p.is_default, p.deleted_at.is_(None))
            )
            if record["pipeline_id"] is None:
                raise RuleViolation(
                    f"{prefix}.pipeline_id",
                    "NO_DEFAULT_PIPELINE",
                    "the tenant has no default pipeline; name one",
                )
        elif old is None or old["pipeline_id"] != record["pipeline_id"]:
            pipeline = await repo.load(tx, model.PIPELINE, record["pipeline_id"])
            if pipeline is None:
                raise not_found(model.PIPELINE, record["pipeline_id"], f"{prefix}.pipeline_id")
            if not pipeline["is_active"]:
                raise RuleViolation(
                    f"{prefix}.pipeline_id", "PIPELINE_INACTIVE", "the pipeline is not active"
                )
        stage_changed = old is None or old["stage_id"] != record.get("stage_id")
        if record.get("stage_id") is None or (
            old is not None
            and old["pipeline_id"] != record["pipeline_id"]
            and old["stage_id"] == record["stage_id"]
        ):
            # No stage (or a new pipeline without a new stage): the pipeline's first stage.
            first = (
                (
                    await tx.session.execute(
                        select(tables.pipeline_stages)
                        .where(s.tenant_id == tx.tenant_id, s.pipeline_id == record["pipeline_id"])
                        .order_by(s.stage_order)
                        .limit(1)
                    )
                )
                .mappings()
                .first()
            )
            if first is None:
                raise RuleViolation(
                    f"{prefix}.pipeline_id", "PIPELINE_HAS_NO_STAGES", "the pipeline has no stages"
                )
            stage: Row = dict(first)
            record["stage_id"] = stage["id"]
            stage_changed = True
        elif stage_changed:
            found = await repo.load(tx, model.STAGE, record["stage_id"])
            if found is None:
                raise not_found(model.STAGE, record["stage_id"], f"{prefix}.stage_id")
            stage = found
            if stage["pipeline_id"] != record["pipeline_id"]:
                raise RuleViolation(
                    f"{prefix}.stage_id", "STAGE_NOT_IN_PIPELINE", "the stage belongs to another pipeline"
                )
        if stage_changed:
            # The stage sets what the client left open (on update, a new stage resets them all).
            given = {k: record.get(k) for k in ("probability", "is_closed", "is_won")} if old is None else {}
            for column in ("probability", "is_closed", "is_won"):
                if given.get(column) is None:
                    record[column] = stage[column]
            if (
                record["is_closed"]
                and record.get("actual_close_date") is None
                and given.get("is_closed") is None
            ):
                record["actual_close_date"] = tx.now.date()
        for column, target in (("account_id", model.ACCOUNT), ("contact_id", model.CONTACT)):
            if record.get(column) is not None and (old is None or old.get(column) != record[column]):
                await self._require(tx, target, record[column], f"{prefix}.{column}")
        if record.get("currency") is None or old is None or old.get("currency") != record.get("currency"):
            supported = await self.supported_currencies(tx)
            if record.get("currency") is None:
                record["currency"] = (
                    DEFAULT_CURRENCIES[0] if DEFAULT_CURRENCIES[0] in supported else supported[0]
                )
            if record.get("currency") not in supported:
                raise InvalidArgument(
                    [
                        FieldViolation(
                            f"{prefix}.currency",
                            "must be one of the tenant's supported currencies: " + ", ".join(supported),
                        )
                    ]
                )
        raise_if(rules.validate_deal(record, prefix))

    # --- accounts ----------------------------------------------------------------------------

    async def hierarchy(self, account_id: uuid.UUID, max_depth: int) -> Hierarchy:
        depth = min(max_depth or MAX_HIERARCHY_DEPTH, MAX_HIERARCHY_DEPTH)
        async with self.transaction(write=False) as (_, tx):
            account = await repo.load(tx, model.ACCOUNT, account_id)
            if account is None:
                raise not_found(model.ACCOUNT, account_id)
            up = await tx.session.execute(
                text(
                    """WITH RECURSIVE up(id, parent_account_id, depth) AS (
                           SELECT id, parent_account_id, 0 FROM core.accounts
                           WHERE tenant_id = :t AND id = :id
                           UNION
                           SELECT a.id, a.parent_account_id, up.depth - 1 FROM core.accounts a
                           JOIN up ON a.id = up.parent_account_id
                           WHERE a.tenant_id = :t AND a.deleted_at IS NULL AND up.depth > :min_depth
                       )
                       SELECT a.*, up.depth AS hierarchy_depth FROM up
                       JOIN core.accounts a ON a.tenant_id = :t AND a.id = up.id
                       WHERE up.depth < 0 ORDER BY up.depth"""
                ),
                {"t": tx.tenant_id, "id": account_id, "min_depth": -MAX_HIERARCHY_DEPTH},
            )
            down = await tx.session.execute(
                text(
                    """WITH RECURSIVE down(id, depth, path) AS (
                           SELECT id, 1, ARRAY[name::text, id::text] FROM core.accounts
                           WHERE tenant_id = :t AND parent_account_id = :id AND deleted_at IS NULL
                           UNION ALL
                           SELECT a.id, down.depth + 1, down.path || ARRAY[a.name::text, a.id::text]
                           FROM core.accounts a JOIN down ON a.parent_account_id = down.id
                           WHERE a.tenant_id = :t AND a.deleted_at IS NULL AND down.depth < :max
                             AND NOT (a.id::text = ANY (down.path))
                       )
                       SELECT a.*, down.depth AS hierarchy_depth FROM down
                       JOIN core.accounts a ON a.tenant_id = :t AND a.id = down.id
                       ORDER BY down.path"""
                ),
                {"t": tx.tenant_id, "id": account_id, "max": depth},
            )

            def split(rows: Any) -> list[tuple[Row, int]]:
                out = []
                for mapping in rows.mappings():
                    row = dict(mapping)
                    out.append((row, int(row.pop("hierarchy_depth"))))
                return out

            ancestors = list(reversed(split(up)))
            ancestors.sort(key=lambda pair: pair[1])
            return Hierarchy(account, ancestors, split(down))

    # --- leads -------------------------------------------------------------------------------

    async def convert_lead(
        self,
        lead_id: uuid.UUID,
        *,
        account_id: uuid.UUID | None,
        account_values: dict[str, Any],
        create_deal: bool,
        deal_values: dict[str, Any],
        violations: list[FieldViolation],
        etag_version: int | None,
    ) -> Conversion:
        raise_if(violations)
        async with self.transaction(write=True) as (uow, tx):
            lead = await repo.load(tx, model.LEAD, lead_id, for_update=True)
            if lead is None:
                raise not_found(model.LEAD, lead_id)
            check_etag(etag_version, lead, model.LEAD)
            if lead["converted"]:
                raise RuleViolation(
                    "id",
                    "LEAD_ALREADY_CONVERTED",
                    f"lead {lead_id} was converted on {lead['converted_date']}",
                )
            full_name = f"{lead['first_name']} {lead['last_name']}"
            if account_id is not None:
                account = await repo.load(tx, model.ACCOUNT, account_id)
                if account is None:
                    raise not_found(model.ACCOUNT, account_id, "account_id")
            else:
                from_lead = {
                    "name": lead["company"] or full_name,
                    "industry": lead["industry"],
                    "website": lead["website"],
                    "annual_revenue": lead["annual_revenue"],
                    "employee_count": lead["employee_count"],
                }
                given = {k: v for k, v in account_values.items() if v not in (None, {})}
                account = await self.create_in(tx, model.ACCOUNT, {**from_lead, **given}, [], "account")
            contact = await self.create_in(
                tx,
                model.CONTACT,
                {
                    "account_id": account["id"],
                    "first_name": lead["first_name"],
                    "last_name": lead["last_name"],
                    "email": lead["email"],
                    "phone": lead["phone"],
                    "title": lead["title"],
                    "lead_source": lead["lead_source"],
                    "mailing_address": lead["mailing_address"],
                },
                [],
                "contact",
            )
            deal = None
            if create_deal:
                given = {k: v for k, v in deal_values.items() if v not in (None, {})}
                deal = await self.create_in(
                    tx,
                    model.DEAL,
                    {
                        "name": f"{lead['company'] or full_name} deal",
                        "lead_source": lead["lead_source"],
                        **given,
                        "account_id": account["id"],
                        "contact_id": contact["id"],
                        # Always the default pipeline's first stage, as the call promises.
                        "pipeline_id": None,
                        "stage_id": None,
                    },
                    [],
                    "deal",
                )
            converted = await repo.update_row(
                tx,
                model.LEAD,
                lead,
                {
                    "converted": True,
                    "converted_date": tx.now,
                    "lead_status": "converted",
                    "converted_contact_id": contact["id"],
                    "converted_account_id": account["id"],
                    "converted_deal_id": deal["id"] if deal else None,
                },
            )
            await uow.commit()
        return Conversion(converted, contact, account, deal)

    # --- deals -------------------------------------------------------------------------------

    async def move_deal_stage(
        self, deal_id: uuid.UUID, stage_id: uuid.UUID, close_date: dt.date | None, etag_version: int | None
    ) -> Row:
        async with self.transaction(write=True) as (uow, tx):
            deal = await repo.load(tx, model.DEAL, deal_id, for_update=True)
            if deal is None:
                raise not_found(model.DEAL, deal_id)
            check_etag(etag_version, deal, model.DEAL)
            stage = await repo.load(tx, model.STAGE, stage_id)
            if stage is None:
                raise not_found(model.STAGE, stage_id, "stage_id")
            if stage["pipeline_id"] != deal["pipeline_id"]:
                raise RuleViolation(
                    "stage_id", "STAGE_NOT_IN_PIPELINE", "the stage belongs to another pipeline"
                )
            changes: dict[str, Any] = {
                "stage_id": stage["id"],
                "probability": stage["probability"],
                "is_closed": stage["is_closed"],
                "is_won": stage["is_won"],
                # Closing dates the deal; reopening clears the date.
                "actual_close_date": (close_date or deal["actual_close_date"] or tx.now.date())
                if stage["is_closed"]
                else None,
            }
            changes = _changed(deal, {**deal, **changes})
            row = await repo.update_row(tx, model.DEAL, deal, changes) if changes else deal
            await uow.commit()
        return row

    async def list_currencies(self) -> list[str]:
        async with self.transaction(write=False) as (_, tx):
            return await self.supported_currencies(tx)

    async def set_currencies(self, codes: Sequence[str]) -> list[str]:
        wanted = sorted({code.strip() for code in codes})
        violations = [
            FieldViolation(f"currency_codes[{i}]", "must be a three-letter ISO 4217 code in upper case")
            for i, code in enumerate(codes)
            if not rules.CURRENCY_RE.match(code.strip())
        ]
        if not wanted:
            violations.append(FieldViolation("currency_codes", "must name at least one currency"))
        raise_if(violations)
        c = tables.tenant_currencies.c
        async with self.transaction(write=True) as (uow, tx):
            await tx.session.execute(delete(tables.tenant_currencies).where(c.tenant_id == tx.tenant_id))
            await tx.session.execute(
                insert(tables.tenant_currencies),
                [{"tenant_id": tx.tenant_id, "currency_code": code, "created_at": tx.now} for code in wanted],
            )
            await uow.commit()
        return wanted

    # --- pipelines ---------------------------------------------------------------------------

    async def _stages(self, tx: Tx, pipeline_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[Row]]:
        s = tables.pipeline_stages.c
        out: dict[uuid.UUID, list[Row]] = {pid: [] for pid in pipeline_ids}
        if not pipeline_ids:
            return out
        rows = await tx.session.execute(
            select(tables.pipeline_stages)
            .where(s.tenant_id == tx.tenant_id, s.pipeline_id.in_(list(pipeline_ids)))
            .order_by(s.pipeline_id, s.stage_order)
        )
        for mapping in rows.mappings():
            out[mapping["pipeline_id"]].append(dict(mapping))
        return out

    async def pipeline_views(self, rows: Sequence[Row]) -> list[PipelineView]:
        async with self.transaction(write=False) as (_, tx):
            stages = await self._stages(tx, [r["id"] for r in rows])
        return [PipelineView(r, stages[r["id"]]) for r in rows]

    async def create_pipeline(
        self,
        values: dict[str, Any],
        stages: Sequence[dict[str, Any]],
        violations: list[FieldViolation],
    ) -> PipelineView:
        violations = list(violations)
        names: set[str] = set()
        orders: set[int] = set()
        next_order = 1
        prepared = []
        for i, stage in enumerate(stages):
            prefix = f"pipeline.stages[{i}]"
            record = {k: v for k, v in stage.items() if v is not None}
            record.setdefault("probability", 0)
            record.setdefault("is_closed", False)
            record.setdefault("is_won", False)
            if record.get("stage_order") is None:
                record["stage_order"] = max([next_order, *(o + 1 for o in orders)])
            violations += rules.validate_stage(record, prefix)
            if record.get("name") in names:
                violations.append(FieldViolation(f"{prefix}.name", "must be unique within the pipeline"))
            if record["stage_order"] in orders:
                violations.append(
                    FieldViolation(f"{prefix}.stage_order", "must be unique within the pipeline")
                )
            names.add(record.get("name") or "")
            orders.add(record["stage_order"])
            next_order = record["stage_order"] + 1
            prepared.append(record)
        record = {k: v for k, v in values.items() if v is not None}
        for column, default in model.PIPELINE.defaults.items():
            record.setdefault(column, default)
        violations += rules.validate_pipeline(record, "pipeline")
        raise_if(violations)
        async with self.transaction(write=True) as (uow, tx):
            await self.check(tx, model.PIPELINE, record, None, "pipeline")
            pipeline = await repo.insert_row(tx, model.PIPELINE, record)
            created = [
                await repo.insert_row(tx, model.STAGE, {**stage, "pipeline_id": pipeline["id"]})
                for stage in prepared
            ]
            await uow.commit()
        return PipelineView(pipeline, sorted(created, key=lambda r: r["stage_order"]))

    async def _stage_conflicts(self, tx: Tx, record: Mapping[str, Any], prefix: str) -> None:
        s = tables.pipeline_stages.c
        base = select(s.id).where(s.tenant_id == tx.tenant_id, s.pipeline_id == record["pipeline_id"])
        if record.get("id") is not None:
            base = base.where(s.id != record["id"])
        if (await tx.session.execute(base.where(s.name == record["name"]).limit(1))).first():
            raise AlreadyExists(f"{prefix}.name: the pipeline already has a stage named {record['name']!r}")
        if (await tx.session.execute(base.where(s.stage_order == record["stage_order"]).limit(1))).first():
            raise AlreadyExists(
                f"{prefix}.stage_order: the pipeline already has a stage at position {record['stage_order']}"
            )

    async def create_stage(
        self, pipeline_id: uuid.UUID, values: dict[str, Any], violations: list[FieldViolation]
    ) -> Row:
        record = {k: v for k, v in values.items() if v is not None}
        record.setdefault("probability", 0)
        record.setdefault("is_closed", False)
        record.setdefault("is_won", False)
        raise_if([*violations, *rules.validate_stage(record, "stage")])
        async with self.transaction(write=True) as (uow, tx):
            pipeline = await repo.load(tx, model.PIPELINE, pipeline_id, for_update=True)
            if pipeline is None:
                raise not_found(model.PIPELINE, pipeline_id, "pipeline_id")
            record["pipeline_id"] = pipeline_id
            if record.get("stage_order") is None:
                s = tables.pipeline_stages.c
                last = await tx.session.scalar(
                    select(func.max(s.stage_order)).where(
                        s.tenant_id == tx.tenant_id, s.pipeline_id == pipeline_id
                    )
                )
                record["stage_order"] = (last or 0) + 1
            await self._stage_conflicts(tx, record, "stage")
            row = await repo.insert_row(tx, model.STAGE, record)
            await uow.commit()
        return row

    async def update_stage(
        self,
        stage_id: uuid.UUID,
        values: dict[str, Any],
        violations: list[FieldViolation],
        etag_version: int | None,
    ) -> Row:
        raise_if(violations)
        async with self.transaction(write=True) as (uow, tx):
            old = await repo.load(tx, model.STAGE, stage_id, for_update=True)
            if old is None:
                raise not_found(model.STAGE, stage_id)
            check_etag(etag_version, old, model.STAGE)
            record = {**old, **values}
            for column, default in (("probability", 0), ("is_closed", False), ("is_won", False)):
                if record.get(column) is None:
                    record[column] = default
            if record.get("stage_order") is None:
                record["stage_order"] = old["stage_order"]
            raise_if(rules.validate_stage(record, "stage"))
            await self._stage_conflicts(tx, record, "stage")
            changes = _changed(old, record)
            row = await repo.update_row(tx, model.STAGE, old, changes) if changes else old
            await uow.commit()
        return row

    async def delete_stage(self, stage_id: uuid.UUID, etag_version: int | None) -> PipelineView:
        async with self.transaction(write=True) as (uow, tx):
            old = await repo.load(tx, model.STAGE, stage_id, for_update=True)
            if old is None:
                raise not_found(model.STAGE, stage_id)
            check_etag(etag_version, old, model.STAGE)
            # Soft-deleted deals count too: their stage must still exist when they are undeleted.
            deals = await repo.count(tx, model.DEAL, tables.deals.c.stage_id == stage_id)
            if deals:
                raise RuleViolation(
                    "id", "STAGE_IN_USE", f"{deals} deal(s) are in this stage; move them first"
                )
            await repo.delete_rows(tx, model.STAGE, tables.pipeline_stages.c.id == stage_id)
            pipeline = await repo.load(tx, model.PIPELINE, old["pipeline_id"], include_deleted=True)
            assert pipeline is not None
            stages = await self._stages(tx, [pipeline["id"]])
            await uow.commit()
        return PipelineView(pipeline, stages[pipeline["id"]])

    async def reorder_stages(self, pipeline_id: uuid.UUID, stage_ids: Sequence[uuid.UUID]) -> PipelineView:
        async with self.transaction(write=True) as (uow, tx):
            pipeline = await repo.load(tx, model.PIPELINE, pipeline_id, for_update=True)
            if pipeline is None:
                raise not_found(model.PIPELINE, pipeline_id, "pipeline_id")
            current = (await self._stages(tx, [pipeline_id]))[pipeline_id]
            by_id = {row["id"]: row for row in current}
            if len(stage_ids) != len(set(stage_ids)) or set(stage_ids) != set(by_id):
                raise InvalidArgument(
                    [FieldViolation("stage_ids", "must list every stage of the pipeline exactly once")]
                )
            # The unique (pipeline_id, stage_order) constraint is deferred, so swaps pass.
            updated = []
            for position, stage_id in enumerate(stage_ids, start=1):
                row = by_id[stage_id]
                if row["stage_order"] != position:
                    row = await repo.update_row(tx, model.STAGE, row, {"stage_order": position})
                updated.append(row)
            await uow.commit()
        return PipelineView(pipeline, updated)
