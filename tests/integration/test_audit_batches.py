# ruff: noqa: F811  (fixtures are imported from test_audit_support, then used as arguments)
"""Batched audit ingest on a real database: one batch holds many events of several tenants and
records, is written with a handful of set-based statements, and keeps every guarantee of the
one-by-one log: each event stored once however often it is delivered, a dense verifiable chain
per tenant, field history, and exactly one current version per record, the highest."""

from __future__ import annotations

import datetime as dt
import json
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from crm.v1 import audit_pb2
from services.audit.adapters.store import ChangeRow, decode_change, write_changes
from shared.db import asyncpg_dsn
from tests.integration.test_audit_support import (  # noqa: F401  (the fixture is used as an argument)
    AuditHarness,
    audit,
    contact_change_event,
)

pytestmark = pytest.mark.integration

START = dt.datetime.now(dt.UTC).replace(microsecond=0)


@pytest.fixture
async def pool(audit: AuditHarness) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(asyncpg_dsn(audit.app_dsn), min_size=1, max_size=2)
    yield created
    await created.close()


def change(
    tenant: str,
    record: str,
    operation: str,
    version: int,
    *,
    old: dict[str, Any] | None = None,
    new: dict[str, Any] | None = None,
    at: int = 0,
) -> ChangeRow:
    """One change event as the consumer decodes it off the stream."""
    event = contact_change_event(
        tenant,
        record,
        operation,
        version,
        old=old,
        new=new,
        email="writer@example.com",
        endpoint="/crm.v1.ImportService/ImportRecords",
    )
    event.occur_time.FromDatetime(START + dt.timedelta(microseconds=at))
    return decode_change(event.SerializeToString())


def inserts(tenant: str, count: int, start: int = 0) -> list[ChangeRow]:
    return [
        change(
            tenant,
            str(uuid.uuid4()),
            "INSERT",
            1,
            new={"first_name": f"Row {i}", "ssn": "123", "custom_fields": {"n": i}},
            at=i,
        )
        for i in range(start, start + count)
    ]


async def verify(audit: AuditHarness, tenant: str) -> audit_pb2.VerifyAuditChainResponse:
    return await audit.stub.VerifyAuditChain(  # type: ignore[no-any-return]
        audit_pb2.VerifyAuditChainRequest(), metadata=audit.meta(tenant)
    )


async def versions(audit: AuditHarness, tenant: str, record: str) -> list[tuple[int, bool, str]]:
    rows = await audit.admin_sql(
        "SELECT version_number, is_current, operation FROM audit.record_versions "
        "WHERE tenant_id = $1 AND record_id = $2 ORDER BY version_number",
        uuid.UUID(tenant),
        uuid.UUID(record),
    )
    return [(r["version_number"], r["is_current"], r["operation"]) for r in rows]


async def test_a_large_batch_of_several_tenants_is_chained_and_a_redelivery_stores_nothing_twice(
    audit: AuditHarness, pool: asyncpg.Pool
) -> None:
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    batch = inserts(first, 1500) + inserts(second, 40)
    random.shuffle(batch)  # delivery order is not time order
    assert await write_changes(pool, batch) == 1540
    # Redelivered together with new events (as after a crash before the acknowledgement): only
    # the new ones are stored, and they continue each chain.
    later = inserts(first, 10, start=1500)
    assert await write_changes(pool, [*batch[:700], *later, *batch[700:]]) == 10
    assert await write_changes(pool, later) == 0
    for tenant, count in ((first, 1510), (second, 40)):
        report = await verify(audit, tenant)
        assert report.valid and report.entries_checked == count and report.head_sequence == count
    stored = await audit.admin_sql(
        "SELECT chain_seq, new_values, changed_at FROM audit.audit_logs WHERE tenant_id = $1 "
        "ORDER BY chain_seq",
        uuid.UUID(first),
    )
    assert [r["chain_seq"] for r in stored] == list(range(1, 1511))
    # Chained in the order the changes happened, and masked.
    assert [r["changed_at"] for r in stored] == sorted(r["changed_at"] for r in stored)
    assert all(json.loads(r["new_values"])["ssn"] == "***" for r in stored)
    current = await audit.admin_sql(
        "SELECT count(*) AS n, count(*) FILTER (WHERE is_current) AS current FROM audit.record_versions "
        "WHERE tenant_id = $1",
        uuid.UUID(first),
    )
    assert (current[0]["n"], current[0]["current"]) == (1510, 1510)


async def test_versions_across_batches_keep_one_current_the_highest(
    audit: AuditHarness, pool: asyncpg.Pool
) -> None:
    tenant, record = str(uuid.uuid4()), str(uuid.uuid4())
    states = [{"first_name": f"v{i}", "version": i} for i in range(6)]
    v1 = change(tenant, record, "INSERT", 1, new=states[1], at=1)
    v2 = change(tenant, record, "UPDATE", 2, old=states[1], new=states[2], at=2)
    v3 = change(tenant, record, "UPDATE", 3, old=states[2], new=states[3], at=3)
    v4 = change(tenant, record, "UPDATE", 4, old=states[3], new=states[4], at=4)
    v5 = change(tenant, record, "UPDATE", 5, old=states[4], new=states[5], at=5)
    await write_changes(pool, [v2, v1])
    assert await versions(audit, tenant, record) == [(1, False, "INSERT"), (2, True, "UPDATE")]
    # A later batch with a newer version moves the current mark; one arriving after a version
    # newer than itself leaves it where it is.
    await write_changes(pool, [v4])
    await write_changes(pool, [v3, v5])
    assert await versions(audit, tenant, record) == [
        (1, False, "INSERT"),
        (2, False, "UPDATE"),
        (3, False, "UPDATE"),
        (4, False, "UPDATE"),
        (5, True, "UPDATE"),
    ]
    history = await audit.admin_sql(
        "SELECT field_name, old_value, new_value FROM audit.field_audit_logs WHERE tenant_id = $1 "
        "AND record_id = $2 AND field_name = 'first_name' ORDER BY changed_at",
        uuid.UUID(tenant),
        uuid.UUID(record),
    )
    assert [(r["old_value"], r["new_value"]) for r in history] == [
        (f"v{i}", f"v{i + 1}") for i in range(1, 5)
    ]
    assert (await verify(audit, tenant)).valid


async def test_versions_numbered_by_arrival_and_a_lost_current_mark_is_put_back(
    audit: AuditHarness, pool: asyncpg.Pool
) -> None:
    tenant, record = str(uuid.uuid4()), str(uuid.uuid4())
    # A publisher without record versions: numbered in arrival order, across batches.
    await write_changes(pool, [change(tenant, record, "INSERT", 0, new={"a": 1}, at=1)])
    await write_changes(
        pool,
        [
            change(tenant, record, "UPDATE", 0, old={"a": 1}, new={"a": 2}, at=2),
            change(tenant, record, "UPDATE", 0, old={"a": 2}, new={"a": 3}, at=3),
        ],
    )
    assert await versions(audit, tenant, record) == [
        (1, False, "INSERT"),
        (2, False, "UPDATE"),
        (3, True, "UPDATE"),
    ]
    # Whatever left the record without a current version, the next batch touching it repairs it,
    # even one whose own version is refused as already stored.
    await audit.admin_sql(
        "UPDATE audit.record_versions SET is_current = false WHERE tenant_id = $1", uuid.UUID(tenant)
    )
    await write_changes(pool, [change(tenant, record, "UPDATE", 2, old={"a": 1}, new={"a": 9}, at=4)])
    assert await versions(audit, tenant, record) == [
        (1, False, "INSERT"),
        (2, False, "UPDATE"),
        (3, True, "UPDATE"),
    ]
    report = await verify(audit, tenant)
    assert report.valid and report.entries_checked == 4
