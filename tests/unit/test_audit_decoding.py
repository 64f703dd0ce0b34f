"""The audit consumers' decoding: good events become rows, poison is recognised as such."""

from __future__ import annotations

import uuid

import pytest

from crm.v1 import common_pb2, events_pb2
from services.audit.adapters.store import UndecodableEvent, decode_api_call, decode_auth, decode_change
from shared.events import timestamp_now

pytestmark = pytest.mark.unit


def good_event(**overrides: object) -> events_pb2.ChangeEvent:
    event = events_pb2.ChangeEvent(
        event_id=str(uuid.uuid4()),
        tenant_id=str(uuid.uuid4()),
        service="tenant",
        table_name="tenants",
        record_id=str(uuid.uuid4()),
        operation=common_pb2.OPERATION_INSERT,
        new_values_json='{"name": "Acme"}',
        occur_time=timestamp_now(),
        actor=common_pb2.Actor(ip_address="10.0.0.1"),
    )
    for key, value in overrides.items():
        if value is None:
            event.ClearField(key)  # type: ignore[arg-type]
        else:
            setattr(event, key, value)
    return event


def test_a_good_event_becomes_a_row() -> None:
    row = decode_change(good_event().SerializeToString())
    assert row.operation == "INSERT" and row.old_values is None and row.new_values == {"name": "Acme"}
    assert row.ip_address == "10.0.0.1"


def test_a_bad_ip_address_is_dropped_not_fatal() -> None:
    event = good_event()
    event.actor.ip_address = "not-an-ip"
    assert decode_change(event.SerializeToString()).ip_address is None


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff not protobuf",
        good_event(tenant_id="not-a-uuid").SerializeToString(),
        good_event(operation=common_pb2.OPERATION_UNSPECIFIED).SerializeToString(),
        good_event(old_values_json='{"a": 1}').SerializeToString(),  # INSERT with old values
        good_event(new_values_json="[1, 2]").SerializeToString(),
        good_event(new_values_json='{"a": "\\u0000"}').SerializeToString(),  # jsonb refuses NUL
        good_event(new_values_json='{"a": "\\ud800"}').SerializeToString(),  # a lone surrogate
        good_event(new_values_json='{"a": ' + "[" * 100_000 + "]" * 100_000 + "}").SerializeToString(),
        good_event(new_values_json='{"a": ' + "9" * 5000 + "}").SerializeToString(),
        good_event(event_id="").SerializeToString(),
        good_event(table_name="").SerializeToString(),
        good_event(operation=common_pb2.OPERATION_UPDATE).SerializeToString(),  # UPDATE without old
        good_event(occur_time=None).SerializeToString(),
    ],
)
def test_poison_is_recognised(payload: bytes) -> None:
    with pytest.raises(UndecodableEvent):
        decode_change(payload)


def auth_event(**overrides: object) -> events_pb2.AuthEvent:
    event = events_pb2.AuthEvent(
        event_id=str(uuid.uuid4()),
        tenant_id=str(uuid.uuid4()),
        email="a@b.io",
        event_type="login_failure",
        success=False,
        failure_reason="bad password",
        ip_address="::1",
        occur_time=timestamp_now(),
    )
    for key, value in overrides.items():
        if value is None:
            event.ClearField(key)  # type: ignore[arg-type]
        else:
            setattr(event, key, value)
    return event


def test_auth_events_decode_and_may_have_no_tenant() -> None:
    row = decode_auth(auth_event(tenant_id="").SerializeToString())
    assert row[1] is None and row[4] == "login_failure" and row[5] is False


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00garbage\xff",
        auth_event(event_type="hacked").SerializeToString(),
        auth_event(event_id="nope").SerializeToString(),
        auth_event(occur_time=None).SerializeToString(),
    ],
)
def test_auth_poison_is_recognised(payload: bytes) -> None:
    with pytest.raises(UndecodableEvent):
        decode_auth(payload)


def api_event(**overrides: object) -> events_pb2.ApiCallEvent:
    event = events_pb2.ApiCallEvent(
        event_id=str(uuid.uuid4()),
        tenant_id=str(uuid.uuid4()),
        endpoint="/crm.v1.AuditService/ListAuditLogs",
        status_code="NOT_FOUND",
        request_size=10,
        response_size=2**40,
        duration_ms=3,
        occur_time=timestamp_now(),
    )
    for key, value in overrides.items():
        if value is None:
            event.ClearField(key)  # type: ignore[arg-type]
        else:
            setattr(event, key, value)
    return event


def test_api_calls_map_grpc_status_to_http_and_clamp_sizes() -> None:
    row = decode_api_call(api_event().SerializeToString())
    assert row[6] == 404 and row[7] == "NOT_FOUND" and row[8] == 2**31 - 1


@pytest.mark.parametrize(
    "payload",
    [
        api_event(status_code="TEAPOT").SerializeToString(),
        api_event(endpoint="").SerializeToString(),
        api_event(tenant_id="x").SerializeToString(),
    ],
)
def test_api_poison_is_recognised(payload: bytes) -> None:
    with pytest.raises(UndecodableEvent):
        decode_api_call(payload)


def test_a_soft_delete_keeps_the_seed_shape_and_its_deleted_state() -> None:
    row = decode_change(
        good_event(
            operation=common_pb2.OPERATION_DELETE,
            old_values_json='{"name": "Acme"}',
            new_values_json='{"name": "Acme", "deleted_at": "2026-01-01T00:00:00Z"}',
        ).SerializeToString()
    )
    assert row.old_values == {"name": "Acme"} and row.new_values is None
    assert row.deleted_state == {"name": "Acme", "deleted_at": "2026-01-01T00:00:00Z"}


def test_a_timestamp_out_of_range_is_poison_not_a_crash() -> None:
    event = good_event()
    event.occur_time.seconds = 2**62
    with pytest.raises(UndecodableEvent):
        decode_change(event.SerializeToString())
