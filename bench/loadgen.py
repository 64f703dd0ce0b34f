"""The load generator: runs in its own process (so it does not share a core's event loop with
what it measures), keeps `concurrency` calls in flight for `seconds`, and returns latencies.

Work is named, not pickled: each kind builds its requests inside the child process.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc


@dataclass
class LoadSpec:
    kind: str  # "grpc_create_contact" | "grpc_list_contacts" | "grpc_list_records" | "raw_insert_contact"
    target: str  # host:port for gRPC, a DSN for raw
    seconds: float
    concurrency: int
    metadata: list[tuple[str, str]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    rate: float = 0.0  # calls per second in total; 0 = as fast as possible


@dataclass
class LoadResult:
    latencies: list[float]
    errors: dict[str, int]
    elapsed: float
    ids: list[tuple[float, str]] = field(default_factory=list)  # (commit time, record id) samples
    cpu_seconds: float = 0.0  # the load generator's own CPU


def contact_request(params: dict[str, Any]) -> bytes:
    from crm.v1 import common_pb2, core_entity_pb2

    n = uuid.uuid4().hex[:12]
    contact = core_entity_pb2.Contact(
        first_name="Bench", last_name=f"Contact {n}", email=f"{n}@bench.example"
    )
    for key, value in params.get("custom_fields", {}).items():
        # bool before int: a bool is an int in Python.
        if isinstance(value, bool):
            typed = common_pb2.FieldValue(bool_value=value)
        elif isinstance(value, int):
            typed = common_pb2.FieldValue(int_value=value)
        else:
            typed = common_pb2.FieldValue(string_value=str(value))
        contact.custom_fields[key].CopyFrom(typed)
    payload: bytes = core_entity_pb2.CreateContactRequest(contact=contact).SerializeToString()
    return payload


def list_request(spec: LoadSpec) -> tuple[str, bytes]:
    from crm.v1 import core_entity_pb2, custom_object_pb2

    query = {
        "page_size": 50,
        "filter": spec.params.get("filter", ""),
        "order_by": spec.params.get("order_by", ""),
    }
    if spec.kind == "grpc_list_records":
        records = custom_object_pb2.ListRecordsRequest(object_type=spec.params["object_type"], **query)
        return "/crm.v1.CustomObjectService/ListRecords", records.SerializeToString()
    return "/crm.v1.ContactService/ListContacts", core_entity_pb2.ListContactsRequest(
        **query
    ).SerializeToString()


async def _grpc_worker(spec: LoadSpec, result: LoadResult, deadline: float, pace: float) -> None:
    from crm.v1 import core_entity_pb2

    async with grpc.aio.insecure_channel(spec.target) as channel:
        if spec.kind == "grpc_create_contact":
            call = channel.unary_unary("/crm.v1.ContactService/CreateContact")
            listing = b""
        else:
            path, listing = list_request(spec)
            call = channel.unary_unary(path)
        next_at = time.perf_counter()
        while time.perf_counter() < deadline:
            if pace:
                next_at += pace
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            request = contact_request(spec.params) if spec.kind == "grpc_create_contact" else listing
            started = time.perf_counter()
            try:
                reply = await call(request, metadata=spec.metadata, timeout=30)
                result.latencies.append(time.perf_counter() - started)
                if (
                    spec.kind == "grpc_create_contact"
                    and len(result.ids) < 200_000
                    and len(result.latencies) % (1 if spec.params.get("record_all_ids") else 5) == 0
                ):
                    result.ids.append((time.time(), core_entity_pb2.Contact.FromString(reply).id))
            except grpc.aio.AioRpcError as exc:
                result.errors[exc.code().name] = result.errors.get(exc.code().name, 0) + 1


async def _raw_worker(spec: LoadSpec, pool: asyncpg.Pool, result: LoadResult, deadline: float) -> None:
    tenant_id = spec.params["tenant_id"]
    while time.perf_counter() < deadline:
        n = uuid.uuid4().hex[:12]
        started = time.perf_counter()
        async with pool.acquire() as conn, conn.transaction():
            # The same row in its own transaction, with the same tenant context a service sets.
            await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant_id)
            await conn.execute(
                "INSERT INTO core.contacts (tenant_id, first_name, last_name, email, custom_fields, "
                "created_by, updated_by) VALUES ($1, 'Bench', $2, $3, $4::jsonb, $5, $5)",
                uuid.UUID(tenant_id),
                f"Contact {n}",
                f"{n}@raw.example",
                spec.params.get("custom_json", "{}"),
                uuid.UUID(spec.params["user_id"]),
            )
        result.latencies.append(time.perf_counter() - started)


async def _run(spec: LoadSpec) -> LoadResult:
    result = LoadResult([], {}, 0.0)
    cpu_started = time.process_time()
    started = time.perf_counter()
    deadline = started + spec.seconds
    pace = spec.concurrency / spec.rate if spec.rate else 0.0
    if spec.kind.startswith("raw_"):
        pool = await asyncpg.create_pool(spec.target, min_size=spec.concurrency, max_size=spec.concurrency)
        try:
            await asyncio.gather(
                *(_raw_worker(spec, pool, result, deadline) for _ in range(spec.concurrency))
            )
        finally:
            await pool.close()
    else:
        await asyncio.gather(*(_grpc_worker(spec, result, deadline, pace) for _ in range(spec.concurrency)))
    result.elapsed = time.perf_counter() - started
    result.cpu_seconds = time.process_time() - cpu_started
    return result


def _child(spec: LoadSpec, queue: Any) -> None:
    import uvloop

    try:
        queue.put(uvloop.run(_run(spec)))
    except BaseException as exc:  # the parent reports it instead of waiting for nothing
        queue.put(RuntimeError(f"load generator failed: {type(exc).__name__}: {exc}"))


def _collect(queue: Any, process: Any, seconds: float) -> LoadResult:
    result = queue.get(timeout=seconds + 120)
    process.join(30)
    if isinstance(result, Exception):
        raise result
    assert isinstance(result, LoadResult)
    return result


def run_load(spec: LoadSpec) -> LoadResult:
    """Runs the load in a separate process and waits for its result."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(spec, queue))
    process.start()
    return _collect(queue, process, spec.seconds)


def start_load(spec: LoadSpec) -> tuple[Any, Any]:
    """Starts the load in the background; `finish_load` collects it."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(spec, queue))
    process.start()
    return process, queue


def finish_load(handle: tuple[Any, Any], seconds: float) -> LoadResult:
    process, queue = handle
    return _collect(queue, process, seconds)
