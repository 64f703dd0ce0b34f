"""Metrics and traces every process exposes the same way.

Prometheus: calls by method and code, latency histograms, outbox depth and age, audit consumer
lag and database pool usage, on CRM_METRICS_PORT. OpenTelemetry: a span per call on the gateway
and on each backend, joined by W3C `traceparent` metadata, and carried through events in their
NATS headers; exported over OTLP/gRPC when CRM_OTLP_ENDPOINT is set, and off otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from prometheus_client import Counter, Gauge, Histogram, start_http_server

CALLS = Counter("crm_grpc_calls", "gRPC calls handled", ["service", "method", "code"])
CALL_SECONDS = Histogram(
    "crm_grpc_call_seconds",
    "gRPC call latency",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
OUTBOX_DEPTH = Gauge("crm_outbox_depth", "Committed events not yet published", ["service"])
OUTBOX_OLDEST_SECONDS = Gauge("crm_outbox_oldest_seconds", "Age of the oldest unpublished event", ["service"])
OUTBOX_PUBLISHED = Counter("crm_outbox_published", "Events published by the outbox relay", ["service"])
AUDIT_CONSUMER_PENDING = Gauge(
    "crm_audit_consumer_pending", "Stream events the audit consumer has not taken yet"
)
AUDIT_INGESTED = Counter("crm_audit_ingested", "Audit entries written")
DB_POOL_CHECKED_OUT = Gauge("crm_db_pool_checked_out", "Database connections in use", ["service"])
DB_POOL_SIZE = Gauge("crm_db_pool_size", "Database connections held by the pool", ["service"])
API_AUDIT_BACKLOG = Gauge("crm_api_audit_backlog", "API audit records waiting to be published")

_started_ports: set[int] = set()
_tracing_ready = False


def start_metrics_server(port: int, host: str = "0.0.0.0") -> None:  # noqa: S104 - scraped from the pod network
    if port and port not in _started_ports:
        start_http_server(port, addr=host)
        _started_ports.add(port)


def setup_tracing(service: str, otlp_endpoint: str) -> None:
    """Installs a tracer provider; spans are exported only when an endpoint is configured."""
    global _tracing_ready
    if _tracing_ready:  # the provider can be set once per process (tests start several apps)
        return
    _tracing_ready = True
    provider = TracerProvider(resource=Resource.create({"service.name": f"crm-{service}"}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
    trace.set_tracer_provider(provider)


@functools.cache
def tracer() -> trace.Tracer:
    # Looked up once: get_tracer per call showed in the gateway's profile. Before the provider
    # is installed this is OpenTelemetry's proxy tracer, which delegates once it is.
    return trace.get_tracer("crm")


@contextmanager
def server_span(name: str, carrier: Mapping[str, str]) -> Iterator[Span]:
    """A server span continuing the caller's trace (traceparent in gRPC metadata or NATS headers)."""
    parent = extract(carrier)
    token = otel_context.attach(parent)
    try:
        with tracer().start_as_current_span(name, kind=SpanKind.SERVER) as span:
            yield span
    finally:
        otel_context.detach(token)


def inject_headers(carrier: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Adds the current trace context (traceparent) to outgoing metadata or event headers."""
    inject(carrier)
    return carrier


def mark_error(span: Span, code_name: str, message: str = "") -> None:
    span.set_attribute("rpc.grpc.status_code", code_name)
    if code_name != "OK":
        span.set_status(Status(StatusCode.ERROR, message[:200]))


def observe_call(service: str, method: str, code_name: str, seconds: float) -> None:
    CALLS.labels(service, method, code_name).inc()
    CALL_SECONDS.labels(service, method).observe(seconds)


def pool_usage(service: str, pool: Any) -> None:
    """Samples a SQLAlchemy QueuePool's usage."""
    try:
        DB_POOL_CHECKED_OUT.labels(service).set(pool.checkedout())
        DB_POOL_SIZE.labels(service).set(pool.size())
    except AttributeError:
        pass
