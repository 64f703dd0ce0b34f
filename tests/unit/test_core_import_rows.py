"""What bulk import builds without the database: each row's stored form and INSERT event are the
same as Create's (`shared.events.to_json`, `build_change_event`), only made faster, and the
random ids it makes are proper version 4 UUIDs."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crm.v1 import common_pb2, events_pb2
from services.core_entity.domain import model
from services.core_entity.domain.model import EntitySpec
from services.core_entity.service_layer.imports import IMPORTABLE, RowBuilder, random_uuids
from shared.context import CallContext, reset_call, set_call
from shared.events import build_change_event, to_json

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
TENANT, ACTOR = uuid.uuid4(), uuid.uuid4()

# Every kind of value a core row holds, including text JSON must escape.
RECORD: dict[str, Any] = {
    "first_name": 'Zoë "Q" 100%',
    "last_name": "O'Brien\n\t\\",
    "name": "Acme ☃",
    "email": "x@example.com",
    "annual_revenue": decimal.Decimal("10.50"),
    "amount": decimal.Decimal("1E+3"),
    "probability": decimal.Decimal("0.25"),
    "expected_close_date": dt.date(2026, 5, 1),
    "due_date": dt.datetime(2026, 5, 1, 9, 30, tzinfo=dt.UTC),
    "account_id": uuid.uuid4(),
    "custom_fields": {"b": 1.5, "a": [1, "x", None], "n": None, "d": decimal.Decimal("2"), "t": True},
    "mailing_address": {"city": "Oslo", "postal_code": "0150"},
    "do_not_call": True,
    "email_opt_out": False,
    "employee_count": 12,
}


@pytest.fixture(autouse=True)
def call() -> Any:
    token = set_call(
        CallContext(
            request_id="req-1",
            method="/crm.v1.ImportService/ImportRecords",
            tenant_id=str(TENANT),
            user_id=str(ACTOR),
            email="importer@example.com",
            ip_address="10.0.0.1",
        )
    )
    yield
    reset_call(token)


@pytest.mark.parametrize("spec", list(IMPORTABLE.values()), ids=lambda spec: spec.name)
def test_rows_and_events_are_those_create_would_make(spec: EntitySpec) -> None:
    build = RowBuilder(spec, TENANT, ACTOR, NOW)
    row, (event_id, subject, payload, _headers) = build(RECORD)
    assert row["id"] != event_id and row["tenant_id"] == TENANT and row["created_by"] == ACTOR
    assert row["version"] == 1 and row["created_at"] == row["updated_at"] == NOW
    assert subject == f"crm.events.{TENANT}.core_entity.{spec.table}.INSERT"
    event = events_pb2.ChangeEvent.FromString(payload)
    # The values byte for byte as shared.events writes them.
    assert event.new_values_json == to_json(row)
    # And the whole event as Create's, but for its own id and time.
    expected = build_change_event(
        tenant_id=str(TENANT),
        service="core_entity",
        table=spec.table,
        record_id=str(row["id"]),
        operation="INSERT",
        old=None,
        new=row,
        version=1,
    )
    expected.event_id = event_id
    expected.occur_time.CopyFrom(event.occur_time)
    assert event == expected
    assert event.operation == common_pb2.OPERATION_INSERT and event.actor.user_id == str(ACTOR)
    assert event.api_endpoint == "/crm.v1.ImportService/ImportRecords" and event.request_id == "req-1"


def test_a_record_id_given_again_is_kept_with_a_new_event() -> None:
    build = RowBuilder(model.CONTACT, TENANT, ACTOR, NOW)
    first, first_outbox = build(RECORD)
    again, again_outbox = build({**RECORD, "first_name": "Changed"}, first["id"])
    assert again["id"] == first["id"] and again_outbox[0] != first_outbox[0]
    changed = json.loads(events_pb2.ChangeEvent.FromString(again_outbox[2]).new_values_json)
    assert changed["first_name"] == "Changed"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@given(st.dictionaries(st.sampled_from(["first_name", "description", "custom_fields", "email"]), json_values))
def test_any_json_values_are_written_as_to_json_writes_them(values: dict[str, Any]) -> None:
    build = RowBuilder(model.CONTACT, TENANT, ACTOR, NOW)
    row, (_, _, payload, _) = build(values)
    assert events_pb2.ChangeEvent.FromString(payload).new_values_json == to_json(row)


def test_random_ids_are_distinct_version_4_uuids() -> None:
    made = random_uuids(5000)
    assert len(set(made)) == len(made)
    for text in made:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text
