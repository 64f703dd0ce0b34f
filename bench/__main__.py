"""`make bench [BENCH_ARGS=--quick]`: starts the suite (embedded, or CRM_DATABASE_URL /
CRM_NATS_URL), loads data, runs each scenario against its raw baseline in the same run, prints
one table and writes bench/results.json and bench/results.png."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import nats
import psutil
from rich.console import Console
from rich.table import Table

from bench.loadgen import LoadResult, LoadSpec, finish_load, run_load, start_load
from cli.stack import Stack
from crm.v1 import (
    core_entity_pb2,
    custom_object_pb2,
    custom_object_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from shared.db import asyncpg_dsn
from shared.events import STREAM_NAME

console = Console()
RESULTS = Path(__file__).parent / "results.json"
CHART = Path(__file__).parent / "results.png"
# A quick run's figures mean nothing; they must not replace the recorded ones.
QUICK_RESULTS = Path(__file__).parent / "results-quick.json"
QUICK_CHART = Path(__file__).parent / "results-quick.png"
# The create scenario's three custom fields on contacts: name -> (field type, value sent).
CONTACT_FIELDS: dict[str, tuple[str, Any]] = {
    "region": ("text", "emea"),
    "score": ("number", 42),
    "vip": ("boolean", True),
}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(result: LoadResult) -> dict[str, Any]:
    return {
        "calls": len(result.latencies),
        "calls_per_s": round(len(result.latencies) / result.elapsed, 1) if result.elapsed else 0,
        "p50_ms": round(percentile(result.latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(result.latencies, 0.99) * 1000, 2),
        "errors": result.errors,
    }


async def jsonb_text_codec(conn: asyncpg.Connection) -> None:
    """COPY is binary: JSON text goes out as jsonb's binary form (a version byte, then the text)."""
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda text: b"\x01" + text.encode(),
        decoder=lambda data: json.loads(data[1:]),
        schema="pg_catalog",
        format="binary",
    )


def cpu_seconds(stack: Stack) -> dict[str, float]:
    """CPU used so far by each service process, and by all PostgreSQL and NATS processes."""
    used: dict[str, float] = {}
    for name, service in stack.services.items():
        if service.process is not None:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(service.process.pid).cpu_times()
                used[name] = times.user + times.system
    for process in psutil.process_iter(["name", "cpu_times"]):
        if process.info["name"] in ("postgres", "nats-server") and process.info["cpu_times"]:
            times = process.info["cpu_times"]
            used[process.info["name"]] = used.get(process.info["name"], 0.0) + times.user + times.system
    machine = psutil.cpu_times()
    used["machine"] = machine.user + machine.system + machine.nice + machine.irq + machine.softirq
    return used


def cpu_per_call(before: dict[str, float], after: dict[str, float], load: LoadResult) -> dict[str, float]:
    """Milliseconds of CPU per successful call: the whole machine's (`machine`, the figure to
    compare), and by process, load generator included (PostgreSQL backends that exit during the
    run are missing from `postgres`, so the raw baseline's breakdown undercounts it)."""
    calls = max(1, len(load.latencies))
    spent = {name: after[name] - before.get(name, 0.0) for name in after}
    spent["load generator"] = load.cpu_seconds
    return {name: round(seconds * 1000 / calls, 2) for name, seconds in spent.items() if seconds > 0.01}


class RssSampler:
    """Peak resident memory of each service process while the scenarios run."""

    def __init__(self, stack: Stack) -> None:
        self._stack = stack
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, service in self._stack.services.items():
                if service.process is not None and service.process.poll() is None:
                    try:
                        rss = psutil.Process(service.process.pid).memory_info().rss / 2**20
                    except psutil.Error:
                        continue
                    self.peaks[name] = max(self.peaks.get(name, 0.0), rss)
            self._stop.wait(0.5)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


class Bench:
    def __init__(self, stack: Stack, seconds: float, quick: bool) -> None:
        self.stack = stack
        self.seconds = seconds
        self.quick = quick
        self.results: dict[str, Any] = {}

    # --- set-up -------------------------------------------------------------------------

    def new_tenant(self) -> tenant_pb2.CreateTenantResponse:
        # Enterprise: the highest rate limit, so the gateway's limiter is not what is measured.
        request = tenant_pb2.CreateTenantRequest(
            tenant=tenant_pb2.Tenant(
                name="Bench",
                subdomain=f"bench-{uuid.uuid4().hex[:10]}",
                plan_type=tenant_pb2.PLAN_TYPE_ENTERPRISE,
            ),
            admin_email="bench@example.com",
            admin_password="BenchPassw0rd",
        )
        with grpc.insecure_channel(self.stack.gateway_address) as channel:
            stub = tenant_pb2_grpc.TenantServiceStub(channel)
            reply: tenant_pb2.CreateTenantResponse = stub.CreateTenant(
                request, metadata=(("authorization", f"Bearer {self.stack.platform_admin_key}"),), timeout=60
            )
        return reply

    def shard_of(self, tenant: tenant_pb2.Tenant) -> tuple[str, dict[str, str]]:
        with grpc.insecure_channel(self.stack.gateway_address) as channel:
            status = gateway_pb2_grpc.GatewayServiceStub(channel).GetGatewayStatus(
                gateway_pb2.GetGatewayStatusRequest(),
                metadata=(("authorization", f"Bearer {self.stack.platform_admin_key}"),),
            )
        name = next(b.shard_name for b in status.backends if b.shard_id == tenant.shard_id)
        urls = self.stack.db_urls(self.stack.database(name.replace("-", "_")))
        return name, urls

    def admin_url(self, urls: dict[str, str]) -> str:
        """The shard database as the server's admin: PostgreSQL refuses COPY FROM into a table with
        row-level security, so the raw baseline writes as a role that bypasses it."""
        database = urls["CRM_DB_URL"].rsplit("/", 1)[1]
        return self.stack.admin_dsn.rsplit("/", 1)[0] + f"/{database}"

    def define_field(
        self,
        created: tenant_pb2.CreateTenantResponse,
        object_type: str,
        name: str,
        field_type: str,
        indexed: bool = False,
    ) -> custom_object_pb2.CustomField:
        field = custom_object_pb2.CustomField(
            object_type=object_type, field_name=name, field_label=name.title(), field_type=field_type,
            is_indexed=indexed,
        )  # fmt: skip
        with grpc.insecure_channel(self.stack.gateway_address) as channel:
            stub = custom_object_pb2_grpc.CustomObjectServiceStub(channel)
            defined: custom_object_pb2.CustomField = stub.CreateCustomField(
                custom_object_pb2.CreateCustomFieldRequest(field=field),
                metadata=self.tenant_metadata(created),
                timeout=60,
            )
        return defined

    async def wait_for_index(self, admin_dsn: str, field: custom_object_pb2.CustomField) -> float:
        """Waits until the field's expression index is built and valid; returns the seconds it took."""
        started = time.perf_counter()
        conn = await asyncpg.connect(asyncpg_dsn(admin_dsn))
        try:
            while time.perf_counter() - started < 600:
                valid = await conn.fetchval(
                    "SELECT bool_and(i.indisvalid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                    "WHERE c.relname LIKE '%' || $1",
                    uuid.UUID(field.id).hex,
                )
                if valid:
                    return time.perf_counter() - started
                await asyncio.sleep(0.5)
        finally:
            await conn.close()
        raise TimeoutError(f"no valid index for custom field {field.field_name} after 10 minutes")

    def tenant_metadata(self, created: tenant_pb2.CreateTenantResponse) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {created.api_key}")]

    def backend_metadata(self, created: tenant_pb2.CreateTenantResponse) -> list[tuple[str, str]]:
        return [
            ("x-crm-internal-token", self.stack.internal_token),
            ("x-crm-tenant-id", created.tenant.id),
            ("x-crm-user-id", created.admin_user_id),
            ("x-crm-request-id", str(uuid.uuid4())),
        ]

    # --- scenarios ----------------------------------------------------------------------

    def create_and_overhead(self) -> None:
        created = self.new_tenant()
        shard, urls = self.shard_of(created.tenant)
        for name, (field_type, _) in CONTACT_FIELDS.items():
            self.define_field(created, "contact", name, field_type)
        values = {name: value for name, (_, value) in CONTACT_FIELDS.items()}
        before = cpu_seconds(self.stack)
        gateway = run_load(
            LoadSpec(
                "grpc_create_contact",
                self.stack.gateway_address,
                self.seconds,
                32,
                self.tenant_metadata(created),
                params={"custom_fields": values},
            )
        )
        gateway_cpu = cpu_per_call(before, cpu_seconds(self.stack), gateway)
        before = cpu_seconds(self.stack)
        raw = run_load(
            LoadSpec(
                "raw_insert_contact",
                asyncpg_dsn(urls["CRM_DB_URL"]),
                self.seconds,
                32,
                params={
                    "tenant_id": created.tenant.id,
                    "user_id": created.admin_user_id,
                    "custom_json": json.dumps(values),
                },
            )
        )
        raw_cpu = cpu_per_call(before, cpu_seconds(self.stack), raw)
        direct = run_load(
            LoadSpec(
                "grpc_create_contact",
                self.stack.services[f"core-entity@{shard}"].address,
                self.seconds,
                32,
                self.backend_metadata(created),
                params={"custom_fields": values},
            )
        )
        g, r, d = summary(gateway), summary(raw), summary(direct)
        self.results["single_create"] = {
            "gateway": g,
            "raw_insert": r,
            "ratio": round(g["calls_per_s"] / r["calls_per_s"], 3) if r["calls_per_s"] else None,
            "target": ">= 0.5",
            "cpu_ms_per_call": {"gateway_create": gateway_cpu, "raw_insert": raw_cpu},
        }
        self.results["gateway_overhead"] = {
            "gateway": g,
            "direct": d,
            "ratio": round(g["calls_per_s"] / d["calls_per_s"], 3) if d["calls_per_s"] else None,
            "target": ">= 0.8",
        }
        self.results["audit_lag"] = asyncio.run(self.audit_lag(created, gateway, urls))

    async def audit_lag(
        self, created: tenant_pb2.CreateTenantResponse, load: LoadResult, urls: dict[str, str]
    ) -> dict[str, Any]:
        committed = dict((record_id, at) for at, record_id in load.ids)
        audit_owner = self.stack.db_urls(self.stack.database("audit"))["CRM_DB_OWNER_URL"]
        deadline = time.monotonic() + 60
        seen: dict[str, float] = {}
        conn = await asyncpg.connect(asyncpg_dsn(audit_owner))
        try:
            await conn.execute("SELECT set_config('app.current_tenant_id', $1, false)", created.tenant.id)
            while time.monotonic() < deadline and len(seen) < len(committed):
                rows = await conn.fetch(
                    "SELECT record_id::text AS id, extract(epoch FROM ingested_at) AS at "
                    "FROM audit.audit_logs WHERE tenant_id = $1 AND record_id = ANY($2::uuid[])",
                    uuid.UUID(created.tenant.id),
                    list(committed),
                )
                seen = {row["id"]: float(row["at"]) for row in rows}
                await asyncio.sleep(0.5)
        finally:
            await conn.close()
        lags = [max(0.0, seen[i] - committed[i]) for i in seen]
        shard = await asyncpg.connect(asyncpg_dsn(urls["CRM_DB_OWNER_URL"]))
        try:
            backlog = await shard.fetchval("SELECT count(*) FROM core.outbox")
        finally:
            await shard.close()
        return {
            "samples": len(committed),
            "stored": len(seen),
            "p50_ms": round(percentile(lags, 0.5) * 1000, 1),
            "p99_ms": round(percentile(lags, 0.99) * 1000, 1),
            "outbox_backlog_at_end": backlog,
            "target": "p99 < 500 ms, backlog 0",
        }

    def settle(self, limit_s: float = 600.0) -> float:
        """Waits until the events of the scenarios before are all stored (no outbox rows on any
        shard, nothing pending for the suite's audit consumers), so a scenario does not measure
        the tail of the previous one; returns the seconds waited."""
        started = time.monotonic()
        asyncio.run(self._drained(started + limit_s))
        return time.monotonic() - started

    async def _drained(self, deadline: float) -> None:
        client = await nats.connect(self.stack.event_url)
        try:
            jetstream = client.jetstream()
            while time.monotonic() < deadline:
                backlog = 0
                for i in range(self.stack.shards):
                    urls = self.stack.db_urls(self.stack.database(f"shard_{i}"))
                    conn = await asyncpg.connect(asyncpg_dsn(self.admin_url(urls)))
                    try:
                        backlog += await conn.fetchval(
                            "SELECT (SELECT count(*) FROM core.outbox) + (SELECT count(*) FROM custom.outbox)"
                        )
                    finally:
                        await conn.close()
                for consumer in await jetstream.consumers_info(STREAM_NAME):
                    if consumer.name.startswith(f"{self.stack.prefix}_audit"):
                        backlog += (consumer.num_pending or 0) + (consumer.num_ack_pending or 0)
                if backlog == 0:
                    return
                await asyncio.sleep(1.0)
        finally:
            await client.close()

    def bulk_import(self) -> None:
        rows = 5_000 if self.quick else 200_000
        created = self.new_tenant()
        _, urls = self.shard_of(created.tenant)
        records = [
            {"first_name": "Imp", "last_name": f"Row {i}", "email": f"imp{i}@bench.example"}
            for i in range(rows)
        ]

        def requests() -> Any:
            first = True
            for start in range(0, rows, 1000):
                message = core_entity_pb2.ImportRecordsRequest(
                    rows=[core_entity_pb2.RecordRow(values=r) for r in records[start : start + 1000]]
                )
                if first:
                    message.import_id = str(uuid.uuid4())
                    message.entity_type = core_entity_pb2.ENTITY_TYPE_CONTACT
                    first = False
                yield message

        started = time.perf_counter()
        with grpc.insecure_channel(
            self.stack.gateway_address, options=[("grpc.max_send_message_length", 64 << 20)]
        ) as ch:
            reply = core_entity_pb2.ImportRecordsResponse.FromString(
                ch.stream_unary("/crm.v1.ImportService/ImportRecords")(
                    (m.SerializeToString() for m in requests()),
                    metadata=self.tenant_metadata(created),
                    timeout=900,
                )
            )
        api_seconds = time.perf_counter() - started
        raw_seconds = asyncio.run(self.raw_copy(created, self.admin_url(urls), rows))
        api_rate, raw_rate = reply.success_count / api_seconds, rows / raw_seconds
        self.results["bulk_import"] = {
            "rows": rows,
            "imported": reply.success_count,
            "api_rows_per_s": round(api_rate),
            "raw_copy_rows_per_s": round(raw_rate),
            "ratio": round(api_rate / raw_rate, 3),
            "target": ">= 0.5",
        }

    async def raw_copy(
        self, created: tenant_pb2.CreateTenantResponse, dsn: str, rows: int, regions: int = 0
    ) -> float:
        """COPY of `rows` contacts; with `regions`, each has custom field region "r<i % regions>"."""
        tenant_id, user = created.tenant.id, uuid.UUID(created.admin_user_id)
        conn = await asyncpg.connect(asyncpg_dsn(dsn))
        try:
            records = [
                (
                    uuid.UUID(tenant_id),
                    "Raw",
                    f"Row {i}",
                    f"raw{i}@bench.example",
                    json.dumps({"region": f"r{i % regions}"} if regions else {}),
                    user,
                    user,
                )
                for i in range(rows)
            ]
            started = time.perf_counter()
            await jsonb_text_codec(conn)
            async with conn.transaction():
                await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant_id)
                await conn.copy_records_to_table(
                    "contacts",
                    schema_name="core",
                    records=records,
                    columns=[
                        "tenant_id",
                        "first_name",
                        "last_name",
                        "email",
                        "custom_fields",
                        "created_by",
                        "updated_by",
                    ],
                )
            return time.perf_counter() - started
        finally:
            await conn.close()

    def list_filter(self) -> None:
        """A tenant with 1M contacts, each with custom field region (1,000 distinct values,
        indexed): a page of 50 filtered on a standard field, then on the custom field."""
        rows = 20_000 if self.quick else 1_000_000
        created = self.new_tenant()
        _, urls = self.shard_of(created.tenant)
        asyncio.run(self.raw_copy(created, self.admin_url(urls), rows, regions=1000))
        region = self.define_field(created, "contact", "region", "text", indexed=True)
        # The first list that reads the tenant's contact fields starts the index build.
        run_load(
            LoadSpec("grpc_list_contacts", self.stack.gateway_address, 1, 1, self.tenant_metadata(created))
        )
        built = asyncio.run(self.wait_for_index(self.admin_url(urls), region))
        asyncio.run(self.analyze(urls["CRM_DB_OWNER_URL"], "core.contacts"))
        for name, query in (
            ("list_filter_standard", {"filter": 'email = "raw4242@bench.example"', "order_by": "last_name"}),
            ("list_filter_custom", {"filter": 'custom_fields.region = "r42"', "order_by": "last_name"}),
        ):
            before = cpu_seconds(self.stack)
            result = run_load(
                LoadSpec(
                    "grpc_list_contacts",
                    self.stack.gateway_address,
                    self.seconds,
                    4,
                    self.tenant_metadata(created),
                    params=query,
                )
            )
            self.results[name] = {
                "rows": rows,
                "filter": query["filter"],
                **summary(result),
                "target": "p99 < 50 ms",
                "cpu_ms_per_call": cpu_per_call(before, cpu_seconds(self.stack), result),
            }
        self.results["list_filter_custom"]["index_build_s"] = round(built, 1)

    def custom_object_records(self) -> None:
        """A custom object with 1M records: a page of 50 filtered on an indexed text field
        (1,000 records per value) and sorted on an indexed number field."""
        rows = 20_000 if self.quick else 1_000_000
        created = self.new_tenant()
        _, urls = self.shard_of(created.tenant)
        with grpc.insecure_channel(self.stack.gateway_address) as channel:
            stub = custom_object_pb2_grpc.CustomObjectServiceStub(channel)
            item = stub.CreateCustomObject(
                custom_object_pb2.CreateCustomObjectRequest(
                    custom_object=custom_object_pb2.CustomObject(
                        name="bench_item", label="Item", plural_label="Items", api_name="bench_item"
                    )
                ),
                metadata=self.tenant_metadata(created),
                timeout=60,
            )
        fields = [
            self.define_field(created, "bench_item", "category", "text", indexed=True),
            self.define_field(created, "bench_item", "rank", "number", indexed=True),
        ]
        for field in fields:  # built on the empty table, then kept up by the COPY
            asyncio.run(self.wait_for_index(self.admin_url(urls), field))
        asyncio.run(self.copy_records(created, item.id, self.admin_url(urls), rows))
        asyncio.run(self.analyze(urls["CRM_DB_OWNER_URL"], "custom.custom_object_records"))
        query = {"object_type": "bench_item", "filter": 'category = "c42"', "order_by": "rank desc"}
        before = cpu_seconds(self.stack)
        result = run_load(
            LoadSpec(
                "grpc_list_records",
                self.stack.gateway_address,
                self.seconds,
                4,
                self.tenant_metadata(created),
                params=query,
            )
        )
        self.results["custom_object_records"] = {
            "rows": rows,
            "filter": query["filter"],
            "order_by": query["order_by"],
            **summary(result),
            "target": "p99 < 50 ms",
            "cpu_ms_per_call": cpu_per_call(before, cpu_seconds(self.stack), result),
        }

    async def copy_records(
        self, created: tenant_pb2.CreateTenantResponse, object_id: str, dsn: str, rows: int
    ) -> None:
        tenant_id, user = uuid.UUID(created.tenant.id), uuid.UUID(created.admin_user_id)
        conn = await asyncpg.connect(asyncpg_dsn(dsn))
        try:
            await jsonb_text_codec(conn)
            async with conn.transaction():
                await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", str(tenant_id))
                await conn.copy_records_to_table(
                    "custom_object_records",
                    schema_name="custom",
                    records=[
                        (
                            tenant_id,
                            uuid.UUID(object_id),
                            json.dumps({"category": f"c{i % 1000}", "rank": i}),
                            user,
                            user,
                        )
                        for i in range(rows)
                    ],
                    columns=["tenant_id", "custom_object_id", "record_data", "created_by", "updated_by"],
                )
        finally:
            await conn.close()

    async def analyze(self, owner_dsn: str, table: str) -> None:
        conn = await asyncpg.connect(asyncpg_dsn(owner_dsn))
        try:
            await conn.execute(f"ANALYZE {table}")
        finally:
            await conn.close()

    def tenant_move(self) -> None:
        """Moves a tenant holding `rows` contacts to the other shard while a writer keeps creating
        its contacts through the gateway; every acknowledged create must be on the target."""
        rows = 10_000 if self.quick else 100_000
        created = self.new_tenant()
        source, urls = self.shard_of(created.tenant)
        asyncio.run(self.raw_copy(created, self.admin_url(urls), rows))
        admin = (("authorization", f"Bearer {self.stack.platform_admin_key}"),)
        with grpc.insecure_channel(self.stack.gateway_address) as channel:
            status = gateway_pb2_grpc.GatewayServiceStub(channel).GetGatewayStatus(
                gateway_pb2.GetGatewayStatusRequest(), metadata=admin
            )
            target_id, target = next(
                (b.shard_id, b.shard_name) for b in status.backends if b.shard_name not in ("", source)
            )
            load_seconds = self.seconds * 3
            writer = start_load(
                LoadSpec(
                    "grpc_create_contact",
                    self.stack.gateway_address,
                    load_seconds,
                    8,
                    self.tenant_metadata(created),
                    params={"record_all_ids": True},
                )
            )
            time.sleep(2)
            tenants = tenant_pb2_grpc.TenantServiceStub(channel)
            started = time.perf_counter()
            move = tenants.MoveTenant(
                tenant_pb2.MoveTenantRequest(tenant_id=created.tenant.id, target_shard_id=target_id),
                metadata=admin,
            )
            done = (tenant_pb2.TENANT_MOVE_PHASE_COMPLETED, tenant_pb2.TENANT_MOVE_PHASE_FAILED)
            while move.phase not in done:
                if time.perf_counter() - started > 900:
                    raise TimeoutError("the move did not finish in 15 minutes")
                time.sleep(0.2)
                move = tenants.GetTenantMove(tenant_pb2.GetTenantMoveRequest(id=move.id), metadata=admin)
            total = time.perf_counter() - started
        load = finish_load(writer, load_seconds)
        acknowledged = [record_id for _, record_id in load.ids]
        on_target, on_source = asyncio.run(self.where_are(acknowledged, target, source))
        self.results["tenant_move"] = {
            "rows": rows,
            "phase": tenant_pb2.TenantMovePhase.Name(move.phase),
            "total_s": round(total, 1),
            "write_block_ms": move.write_block_ms,
            "rows_copied": move.rows_copied,
            "writes_acknowledged": len(acknowledged),
            "lost_writes": len(acknowledged) - on_target,
            "left_on_source": on_source,
            "writer_errors": load.errors,
            "target": "block < 1 s, lost 0",
        }

    async def where_are(self, ids: list[str], target: str, source: str) -> tuple[int, int]:
        """How many of the acknowledged records are on the target shard, and on the source."""
        counts = []
        for shard in (target, source):
            urls = self.stack.db_urls(self.stack.database(shard.replace("-", "_")))
            conn = await asyncpg.connect(asyncpg_dsn(self.admin_url(urls)))
            try:
                counts.append(
                    await conn.fetchval("SELECT count(*) FROM core.contacts WHERE id = ANY($1::uuid[])", ids)
                )
            finally:
                await conn.close()
        return int(counts[0]), int(counts[1])

    def noisy_neighbour(self) -> None:
        quiet, noisy = self.new_tenant(), self.new_tenant()
        params = {"filter": "", "order_by": ""}
        alone = run_load(
            LoadSpec(
                "grpc_list_contacts",
                self.stack.gateway_address,
                self.seconds,
                2,
                self.tenant_metadata(quiet),
                params=params,
                rate=50,
            )
        )
        flood = start_load(
            LoadSpec(
                "grpc_create_contact",
                self.stack.gateway_address,
                self.seconds + 2,
                32,
                self.tenant_metadata(noisy),
            )
        )
        time.sleep(1)
        together = run_load(
            LoadSpec(
                "grpc_list_contacts",
                self.stack.gateway_address,
                self.seconds,
                2,
                self.tenant_metadata(quiet),
                params=params,
                rate=50,
            )
        )
        finish_load(flood, self.seconds + 2)
        a, t = summary(alone), summary(together)
        self.results["noisy_neighbour"] = {
            "b_alone": a,
            "b_with_a_flooding": t,
            "p99_ratio": round(t["p99_ms"] / a["p99_ms"], 2) if a["p99_ms"] else None,
            "target": "<= 2x",
        }


def render(results: dict[str, Any]) -> None:
    table = Table("scenario", "measured", "baseline", "ratio / figure", "target")
    for name, r in results.items():
        if name in ("machine", "memory_mb", "not_run"):
            continue
        if "gateway" in r and "raw_insert" in r:
            table.add_row(
                name,
                f"{r['gateway']['calls_per_s']}/s p50 {r['gateway']['p50_ms']} "
                f"p99 {r['gateway']['p99_ms']} ms",
                f"raw INSERT {r['raw_insert']['calls_per_s']}/s",
                str(r["ratio"]),
                r["target"],
            )
            cpu = r.get("cpu_ms_per_call")
            if cpu:
                table.add_row(
                    "cpu per create",
                    f"{cpu['gateway_create']['machine']} ms of machine CPU",
                    f"raw INSERT {cpu['raw_insert']['machine']} ms",
                    "",
                    "(explains the ratio)",
                )
        elif "direct" in r:
            table.add_row(
                name,
                f"gateway {r['gateway']['calls_per_s']}/s",
                f"direct {r['direct']['calls_per_s']}/s",
                str(r["ratio"]),
                r["target"],
            )
        elif name == "audit_lag":
            table.add_row(
                name,
                f"p50 {r['p50_ms']} p99 {r['p99_ms']} ms ({r['stored']}/{r['samples']})",
                "",
                f"backlog {r['outbox_backlog_at_end']}",
                r["target"],
            )
        elif name == "bulk_import":
            table.add_row(
                name,
                f"{r['api_rows_per_s']} rows/s",
                f"COPY {r['raw_copy_rows_per_s']} rows/s",
                str(r["ratio"]),
                r["target"],
            )
        elif name == "tenant_move":
            table.add_row(
                name,
                f"{r['rows']} rows in {r['total_s']} s ({r['phase']})",
                f"{r['writes_acknowledged']} writes during it",
                f"block {r['write_block_ms']} ms, lost {r['lost_writes']}",
                r["target"],
            )
        elif name == "noisy_neighbour":
            table.add_row(
                name,
                f"B p99 {r['b_with_a_flooding']['p99_ms']} ms",
                f"alone {r['b_alone']['p99_ms']} ms",
                f"{r['p99_ratio']}x",
                r["target"],
            )
        else:
            table.add_row(
                name,
                f"p50 {r.get('p50_ms')} p99 {r.get('p99_ms')} ms ({r.get('rows')} rows)",
                "",
                f"{r.get('calls_per_s')}/s",
                r.get("target", ""),
            )
    for name, peak in results.get("memory_mb", {}).items():
        table.add_row(f"memory {name}", f"peak RSS {peak:.0f} MB", "", "", "< 200 MB")
    console.print(table)
    for name in results.get("not_run", []):
        console.print(f"[yellow]not run[/yellow]: {name}")


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = {k: v["ratio"] for k, v in results.items() if isinstance(v, dict) and v.get("ratio")}
    memory = results.get("memory_mb", {})
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.bar(list(ratios), list(ratios.values()), color="#1976d2")
    left.axhline(0.5, color="#dc004e", linestyle="--", label="target 0.5 (create, import)")
    left.axhline(0.8, color="#ff9800", linestyle=":", label="target 0.8 (gateway)")
    left.set_title("throughput vs raw baseline (same run)")
    left.legend(fontsize=8)
    left.tick_params(axis="x", labelrotation=20)
    right.barh(list(memory), list(memory.values()), color="#43a047")
    right.axvline(200, color="#dc004e", linestyle="--")
    right.set_title("peak RSS per service (MB); target < 200")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: small data, short runs (not for figures)"
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="seconds per measured run (default 20, quick 3)"
    )
    parser.add_argument("--only", nargs="*", default=None, help="scenario names to run")
    options = parser.parse_args()
    seconds = options.seconds or (3.0 if options.quick else 20.0)
    stack = Stack(
        home=Path(tempfile.mkdtemp(prefix="crm-bench-")),
        database_url=os.environ.get("CRM_DATABASE_URL") or None,
        nats_url=os.environ.get("CRM_NATS_URL") or None,
        prefix="crmbench",
        gateway_port=0,
        log_level="warning",
    )
    console.print(f"starting the suite ({'embedded' if not stack.database_url else 'existing servers'})...")
    stack.start()
    bench = Bench(stack, seconds, options.quick)
    scenarios = {
        "single_create+gateway_overhead+audit_lag": bench.create_and_overhead,
        "bulk_import": bench.bulk_import,
        "list_filter": bench.list_filter,
        "custom_object_records": bench.custom_object_records,
        "noisy_neighbour": bench.noisy_neighbour,
        "tenant_move": bench.tenant_move,
    }
    not_run: list[str] = []
    try:
        with RssSampler(stack) as sampler:
            for name, run in scenarios.items():
                if options.only and not any(o in name for o in options.only):
                    continue
                waited = bench.settle()
                console.print(f"running {name} (after {waited:.0f} s for earlier events to drain)...")
                try:
                    run()
                except Exception as exc:  # one broken scenario must not hide the others' figures
                    bench.results.setdefault("not_run", []).append(f"{name}: {type(exc).__name__}: {exc}")
        bench.results["memory_mb"] = {k: round(v, 1) for k, v in sorted(sampler.peaks.items())}
    finally:
        stack.stop()
    bench.results.setdefault("not_run", []).extend(not_run)
    bench.results["machine"] = {
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "quick": options.quick,
        "seconds_per_run": seconds,
    }
    render(bench.results)
    results, chart_path = (QUICK_RESULTS, QUICK_CHART) if options.quick else (RESULTS, CHART)
    results.write_text(json.dumps(bench.results, indent=2, default=str))
    chart(bench.results, chart_path)
    console.print(f"wrote {results} and {chart_path}")
    failed = [n for n in bench.results.get("not_run", []) if ":" in n and "needs" not in n]
    return 1 if failed and options.quick else 0


if __name__ == "__main__":
    sys.exit(main())
