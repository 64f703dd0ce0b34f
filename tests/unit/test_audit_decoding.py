"""The audit consumer's decoding: good events become rows, poison is recognised as such."""

from __future__ import annotations

import uuid

import pytest

from crm.v1 import common_pb2, events_pb2
from services.audit.adapters.store import UndecodableEvent, audit_row
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
        setattr(event, key, value)
    return event


def test_a_good_event_becomes_a_row() -> None:
    row = audit_row(good_event().SerializeToString())
    assert row[5] == "INSERT" and row[6] is None and row[7] == '{"name": "Acme"}' and row[13] == "10.0.0.1"


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff not protobuf",
        good_event(tenant_id="not-a-uuid").SerializeToString(),
        good_event(operation=common_pb2.OPERATION_UNSPECIFIED).SerializeToString(),
        good_event(old_values_json='{"a": 1}').SerializeToString(),  # INSERT with old values
        good_event(new_values_json="[1, 2]").SerializeToString(),
        good_event(event_id="").SerializeToString(),
    ],
)
def test_poison_is_recognised(payload: bytes) -> None:
    with pytest.raises(UndecodableEvent):
        audit_row(payload)
