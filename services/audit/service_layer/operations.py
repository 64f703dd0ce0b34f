"""Use cases that change data in the owning services (restore, retention, erasure), the GDPR
report that counts there, and archiving. The owners do the writing through their internal
DataAdminService, so every change they make is published and audited like any other."""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from google.protobuf import timestamp_pb2

from crm.v1 import data_admin_pb2
from services.audit.adapters.owners import KNOWN_OWNERS, OWNING_SERVICES, Owners
from services.audit.domain import rules
from services.audit.service_layer import compliance
from services.audit.service_layer.db import Violations, caller_tenant, tenant_transaction
from shared.context import CallContext, current_call, reset_call, set_call
from shared.errors import Aborted, CrmError, FailedPrecondition, NotFound, PermissionDenied, invalid
from shared.logging import get_logger

log = get_logger(__name__)

ERASED = "[erased]"
# Keys that identify or order a record rather than describe a person; erasure keeps them so
# the history still says which record changed when.
KEPT_ON_ERASURE = re.compile(r"^(id|tenant_id|version|created_at|updated_at|deleted_at|.*_id)$")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def _stamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def owner_of_table(conn: asyncpg.Connection, tenant_id: str, table: str) -> str | None:
    """The owning service of a table: known tables first, else what the audit log says."""
    if table in KNOWN_OWNERS:
        return KNOWN_OWNERS[table]
    service = await conn.fetchval(
        "SELECT service FROM audit.audit_logs WHERE tenant_id = $1 AND table_name = $2 "
        "ORDER BY changed_at DESC LIMIT 1",
        uuid.UUID(tenant_id),
        table,
    )
    return str(service) if service else None


# --- restore ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Restored:
    table_name: str
    record_id: str
    restored_version: int
    new_version: int


async def restore_record_version(
    pool: asyncpg.Pool, owners: Owners, table_name: str, record_id: str, version_number: int, force: bool
) -> Restored:
    tenant_id = caller_tenant()
    check = Violations()
    table = check.text(table_name, "table_name", required=True, limit=100)
    record = check.uuid(record_id, "record_id", required=True)
    if version_number < 1:
        check.add("version_number", "must be at least 1")
    check.raise_if_any()
    async with tenant_transaction(pool, tenant_id, readonly=True) as conn:
        target = await conn.fetchrow(
            "SELECT * FROM audit.record_versions WHERE tenant_id = $1 AND table_name = $2 "
            "AND record_id = $3 AND version_number = $4",
            uuid.UUID(tenant_id),
            table,
            record,
            version_number,
        )
        latest = await conn.fetchval(
            "SELECT max(version_number) FROM audit.record_versions WHERE tenant_id = $1 "
            "AND table_name = $2 AND record_id = $3",
            uuid.UUID(tenant_id),
            table,
            record,
        )
    if target is None:
        raise NotFound(f"version {version_number} of {table} {record} not found")
    if target["record_data"] is None:
        raise FailedPrecondition("that version's values were erased for a data subject")
    # The owner compares against its own current version: a change the audit log has not seen
    # yet (still in flight) makes the restore ABORTED rather than silently overwritten.
    request = data_admin_pb2.RestoreRecordRequest(
        table_name=table,
        record_id=str(record),
        values_json=str(target["record_data"]),
        expected_version=0 if force else int(latest or 0),
        force=force,
    )
    try:
        reply = await owners.call(
            tenant_id,
            str(target["service"]),
            lambda stub, meta: stub.RestoreRecord(request, metadata=meta, timeout=owners.timeout),
        )
    except Aborted as exc:
        raise Aborted(
            f"{table} {record} changed since version {latest}; look at its history, or restore with force"
        ) from exc
    return Restored(table, str(record), version_number, int(reply.new_version))


# --- retention ----------------------------------------------------------------------------------


@dataclass(slots=True)
class RetentionResult:
    policy_id: str
    table_name: str
    deletion_method: str
    affected_count: int = 0
    error: str = ""


async def run_retention(
    pool: asyncpg.Pool, owners: Owners, tenant_id: str, policy_id: str = ""
) -> list[RetentionResult]:
    """Runs the tenant's active policies (or one policy), each through the table's owner; every
    removed record is written to the deletion log."""
    check = Violations()
    only = check.uuid(policy_id, "policy_id")
    check.raise_if_any()
    async with tenant_transaction(pool, tenant_id, readonly=True) as conn:
        if only is not None:
            policies = await conn.fetch(
                "SELECT * FROM audit.data_retention_policies WHERE tenant_id = $1 AND id = $2",
                uuid.UUID(tenant_id),
                only,
            )
            if not policies:
                raise NotFound("retention policy not found")
        else:
            policies = await conn.fetch(
                "SELECT * FROM audit.data_retention_policies WHERE tenant_id = $1 AND is_active "
                "ORDER BY created_at",
                uuid.UUID(tenant_id),
            )
        owners_by_table = {
            p["table_name"]: await owner_of_table(conn, tenant_id, p["table_name"]) for p in policies
        }
    results = []
    now = dt.datetime.now(dt.UTC)
    for policy in policies:
        result = RetentionResult(str(policy["id"]), policy["table_name"], policy["deletion_method"])
        results.append(result)
        service = owners_by_table[policy["table_name"]]
        if service is None:
            result.error = f"no service is known to own table {policy['table_name']}"
            continue
        older_than = _stamp(now - policy["retention_period"])
        conditions = (
            policy["conditions"]
            if isinstance(policy["conditions"], str)
            else json.dumps(policy["conditions"])
        )
        try:
            if policy["deletion_method"] == "anonymize":
                anonymize = data_admin_pb2.AnonymizeRecordsRequest(
                    table_name=policy["table_name"], older_than=older_than, conditions_json=conditions
                )
                anonymized = await owners.call(
                    tenant_id,
                    service,
                    # Awaited at once, so the closure never sees a later iteration's request.
                    lambda stub, meta: stub.AnonymizeRecords(
                        anonymize,  # noqa: B023
                        metadata=meta,
                        timeout=owners.timeout,
                    ),
                )
                count, record_ids = int(anonymized.affected_count), list(anonymized.record_ids)
            else:
                method = (
                    data_admin_pb2.PURGE_METHOD_HARD_DELETE
                    if policy["deletion_method"] == "hard_delete"
                    else data_admin_pb2.PURGE_METHOD_SOFT_DELETE
                )
                purge = data_admin_pb2.PurgeRecordsRequest(
                    table_name=policy["table_name"],
                    older_than=older_than,
                    conditions_json=conditions,
                    method=method,
                )
                purged = await owners.call(
                    tenant_id,
                    service,
                    lambda stub, meta: stub.PurgeRecords(
                        purge,  # noqa: B023
                        metadata=meta,
                        timeout=owners.timeout,
                    ),
                )
                count, record_ids = int(purged.affected_count), list(purged.record_ids)
        except CrmError as exc:
            result.error = exc.message
            log.warning("retention policy did not run", policy_id=result.policy_id, error=exc.message)
            continue
        result.affected_count = count
        async with tenant_transaction(pool, tenant_id) as conn:
            summary = {
                "policy_id": result.policy_id,
                "policy_name": policy["policy_name"],
                "action": policy["deletion_method"],
            }
            for record_id in record_ids:
                await compliance.add_deletion_log(
                    conn,
                    tenant_id,
                    table_name=policy["table_name"],
                    method="retention_policy",
                    reason=f"retention policy {policy['policy_name']}",
                    count=1,
                    summary=summary,
                    record_id=_uuid_or_none(record_id),
                )
            if count and not record_ids:
                await compliance.add_deletion_log(
                    conn,
                    tenant_id,
                    table_name=policy["table_name"],
                    method="retention_policy",
                    reason=f"retention policy {policy['policy_name']}",
                    count=count,
                    summary=summary,
                )
            await conn.execute(
                "UPDATE audit.data_retention_policies SET last_run_at = now() "
                "WHERE tenant_id = $1 AND id = $2",
                uuid.UUID(tenant_id),
                policy["id"],
            )
    return results


def _uuid_or_none(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


async def tenants_with_retention(pool: asyncpg.Pool) -> list[str]:
    async with pool.acquire() as conn:
        return [str(r[0]) for r in await conn.fetch("SELECT * FROM audit.tenants_with_active_retention()")]


async def run_scheduled_retention(pool: asyncpg.Pool, owners: Owners) -> int:
    """Runs every tenant's active policies, each as that tenant (the call context the use case
    and the owners' metadata read); one tenant's failure does not stop the others. Returns how
    many records were removed."""
    removed = 0
    for tenant_id in await tenants_with_retention(pool):
        token = set_call(CallContext(request_id=f"retention-{uuid.uuid4()}", tenant_id=tenant_id))
        try:
            results = await run_retention(pool, owners, tenant_id)
            removed += sum(r.affected_count for r in results)
        except CrmError as exc:
            log.warning("scheduled retention failed", tenant_id=tenant_id, error=exc.message)
        finally:
            reset_call(token)
    return removed


# --- erasure --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Erasure:
    deletion_log_id: str = ""
    counts: Counter[str] = field(default_factory=Counter)
    audit_entries_anonymized: int = 0
    consents_removed: int = 0
    incomplete_services: list[str] = field(default_factory=list)


def _erase_values(values: Any, email: str, whole: bool) -> Any:
    """Whole records lose every describing value; elsewhere only strings holding the e-mail."""
    if isinstance(values, dict):
        return {
            key: (value if whole and KEPT_ON_ERASURE.match(key) else _erase_values(value, email, whole))
            for key, value in values.items()
        }
    if isinstance(values, list):
        return [_erase_values(v, email, whole) for v in values]
    if whole:
        return None if values is None else ERASED
    if isinstance(values, str) and email and email in values.lower():
        return ERASED
    return values


async def erase_data_subject(
    pool: asyncpg.Pool, owners: Owners, email: str, contact_id: str, lead_id: str, reason: str
) -> Erasure:
    tenant_id = caller_tenant()
    check = Violations()
    email = check.text(email, "email", limit=255).lower()
    if email and not EMAIL.match(email):
        check.add("email", "must be an e-mail address")
    contact = check.uuid(contact_id, "contact_id")
    lead = check.uuid(lead_id, "lead_id")
    reason = check.text(reason, "reason", limit=255)
    if not (email or contact_id or lead_id):
        check.add("email", "give at least one of email, contact_id and lead_id")
    check.raise_if_any()
    erasure = Erasure()
    records: set[tuple[str, uuid.UUID]] = set()
    if contact:
        records.add(("contacts", contact))
    if lead:
        records.add(("leads", lead))
    request = data_admin_pb2.EraseSubjectRequest(email=email, contact_id=contact_id, lead_id=lead_id)
    addresses: set[str] = set()
    for service in OWNING_SERVICES:
        try:
            address = await owners.address(tenant_id, service)
            if address in addresses:
                # One process serving several roles (tests, small installs) is asked once.
                continue
            addresses.add(address)
            reply = await owners.call(
                tenant_id,
                service,
                lambda stub, meta: stub.EraseSubject(request, metadata=meta, timeout=owners.timeout),
            )
        except CrmError as exc:
            erasure.incomplete_services.append(service)
            log.warning("erasure incomplete", service=service, error=exc.message)
            continue
        for count in reply.counts:
            erasure.counts[count.table_name] += count.count
        for ref in reply.records:
            parsed = _uuid_or_none(ref.record_id)
            if parsed is not None:
                records.add((ref.table_name, parsed))
    contacts = [r for t, r in records if t == "contacts"]
    leads = [r for t, r in records if t == "leads"]
    tenant = uuid.UUID(tenant_id)
    async with tenant_transaction(pool, tenant_id) as conn:
        erasure.consents_removed = int(
            await conn.fetchval(
                "WITH gone AS (DELETE FROM audit.consent_records WHERE tenant_id = $1 "
                "AND (contact_id = ANY($2::uuid[]) OR lead_id = ANY($3::uuid[])) RETURNING 1) "
                "SELECT count(*) FROM gone",
                tenant,
                contacts,
                leads,
            )
        )
        erasure.audit_entries_anonymized = await _erase_audit_values(conn, tenant, records, email)
        summary = {
            "tables": dict(sorted(erasure.counts.items())),
            "audit_entries_anonymized": erasure.audit_entries_anonymized,
            "consents_removed": erasure.consents_removed,
            "incomplete_services": erasure.incomplete_services,
            # Which identifiers were given, never their values.
            "identified_by": [
                k for k, v in (("email", email), ("contact_id", contact_id), ("lead_id", lead_id)) if v
            ],
        }
        log_id = await compliance.add_deletion_log(
            conn,
            tenant_id,
            table_name="*",
            method="gdpr_erasure",
            reason=reason or "data subject erasure request",
            count=sum(erasure.counts.values()) + erasure.consents_removed,
            summary=summary,
        )
    erasure.deletion_log_id = str(log_id)
    return erasure


async def _erase_audit_values(
    conn: asyncpg.Connection, tenant: uuid.UUID, records: set[tuple[str, uuid.UUID]], email: str
) -> int:
    record_ids = sorted({r for _, r in records}, key=str)
    pattern = f"%{_like_escape(email)}%" if email else None
    touched = 0
    for source in ("audit.audit_logs", "audit_archive.audit_logs"):
        rows = await conn.fetch(
            f"SELECT id, changed_at, table_name, record_id, old_values, new_values, erased_at, "
            f"old_values_digest, new_values_digest FROM {source} WHERE tenant_id = $1 AND ("
            "record_id = ANY($2::uuid[]) OR ($3::text IS NOT NULL AND "
            "(lower(old_values::text) LIKE $3 OR lower(new_values::text) LIKE $3)))",
            tenant,
            record_ids,
            pattern,
        )
        for row in rows:
            whole = (row["table_name"], row["record_id"]) in records
            old, new = rules.parse_json(row["old_values"]), rules.parse_json(row["new_values"])
            # The chain covers digests of the values: keep the original digests, then erase.
            old_digest = row["old_values_digest"] or rules.values_digest(old)
            new_digest = row["new_values_digest"] or rules.values_digest(new)
            await conn.execute(
                f"UPDATE {source} SET old_values = $3::jsonb, new_values = $4::jsonb, erased_at = now(), "
                "old_values_digest = $5, new_values_digest = $6 WHERE id = $1 AND changed_at = $2",
                row["id"],
                row["changed_at"],
                _dump(_erase_values(old, email, whole)),
                _dump(_erase_values(new, email, whole)),
                old_digest,
                new_digest,
            )
            touched += 1
    for source in ("audit.field_audit_logs", "audit_archive.field_audit_logs"):
        await conn.execute(
            f"UPDATE {source} SET old_value = CASE WHEN old_value IS NULL THEN NULL ELSE $3 END, "
            "new_value = CASE WHEN new_value IS NULL THEN NULL ELSE $3 END "
            "WHERE tenant_id = $1 AND (record_id = ANY($2::uuid[]) OR ($4::text IS NOT NULL AND "
            "(lower(old_value) LIKE $4 OR lower(new_value) LIKE $4)))",
            tenant,
            record_ids,
            ERASED,
            pattern,
        )
    versions = await conn.fetch(
        "SELECT id, table_name, record_id, record_data FROM audit.record_versions WHERE tenant_id = $1 AND "
        "(record_id = ANY($2::uuid[]) OR ($3::text IS NOT NULL AND lower(record_data::text) LIKE $3))",
        tenant,
        record_ids,
        pattern,
    )
    for version in versions:
        whole = (version["table_name"], version["record_id"]) in records
        await conn.execute(
            "UPDATE audit.record_versions SET record_data = $2::jsonb WHERE id = $1",
            version["id"],
            _dump(_erase_values(rules.parse_json(version["record_data"]), email, whole)),
        )
        touched += 1
    return touched


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _dump(values: Any) -> str | None:
    if values is None:
        return None
    return json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)


# --- GDPR report -----------------------------------------------------------------------------------


@dataclass(slots=True)
class ReportActivity:
    activity: dict[str, Any]
    table_counts: dict[str, int]


@dataclass(slots=True)
class GdprReport:
    activities: list[ReportActivity]
    active_consents: int
    withdrawn_consents: int
    deletion_log_entries: int
    uncounted_tables: list[str]


async def gdpr_report(pool: asyncpg.Pool, owners: Owners) -> GdprReport:
    """The seed's generate_gdpr_report, with counts asked of the owning services for every data
    category that names a table (not just contacts and leads)."""
    tenant_id = caller_tenant()
    async with tenant_transaction(pool, tenant_id, readonly=True) as conn:
        activities = await compliance.all_processing_activities(conn, tenant_id)
        tables = sorted({c for a in activities for c in a["data_categories"]})
        table_owners = {t: await owner_of_table(conn, tenant_id, t) for t in tables}
        consents = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE consent_given AND withdrawn_date IS NULL) AS active, "
            "count(*) FILTER (WHERE withdrawn_date IS NOT NULL) AS withdrawn "
            "FROM audit.consent_records WHERE tenant_id = $1",
            uuid.UUID(tenant_id),
        )
        deletions = await conn.fetchval(
            "SELECT count(*) FROM audit.data_deletion_logs WHERE tenant_id = $1", uuid.UUID(tenant_id)
        )
    counts: dict[str, int] = {}
    uncounted: list[str] = []
    for table, service in table_owners.items():
        if service is None:
            continue  # a category such as "marketing" that is not a table
        try:
            reply = await owners.call(
                tenant_id,
                service,
                lambda stub, meta: stub.CountRecords(
                    data_admin_pb2.CountRecordsRequest(table_name=table),  # noqa: B023
                    metadata=meta,
                    timeout=owners.timeout,
                ),
            )
        except CrmError as exc:
            log.warning("could not count records", table=table, error=exc.message)
            uncounted.append(table)
            continue
        counts[table] = int(reply.count)
    assert consents is not None
    return GdprReport(
        activities=[
            ReportActivity(a, {c: counts[c] for c in a["data_categories"] if c in counts}) for a in activities
        ],
        active_consents=int(consents["active"]),
        withdrawn_consents=int(consents["withdrawn"]),
        deletion_log_entries=int(deletions),
        uncounted_tables=uncounted,
    )


# --- archive ------------------------------------------------------------------------------------


def require_platform_admin() -> None:
    if not current_call().platform_admin:
        raise PermissionDenied(
            "archiving moves every tenant's old partitions: it needs the platform credential"
        )


async def archive_audit_logs(pool: asyncpg.Pool, before: dt.datetime | None) -> list[tuple[str, int]]:
    now = dt.datetime.now(dt.UTC)
    before = before or now - dt.timedelta(days=365)
    if before > now:
        raise invalid("before", "must not be in the future")
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch("SELECT * FROM audit.archive_audit_partitions($1)", before)
    archived = [(str(r["partition_name"]), int(r["row_count"])) for r in rows]
    if archived:
        log.info("archived audit partitions", partitions=[name for name, _ in archived])
    return archived
