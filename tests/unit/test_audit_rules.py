"""The audit log's plain rules: masking, changed fields by value, field-level changes, the
canonical form entries are hashed in, and the chain verifier."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.audit.domain import rules

pytestmark = pytest.mark.unit

TENANT_RULES = rules.SensitiveFields(frozenset({("contacts", "birth_date"), ("*", "salary")}))


@pytest.mark.parametrize(
    "field",
    [
        "password",
        "ssn",
        "tax_id",
        "credit_card",
        "bank_account",
        "api_key",
        "secret",
        "new_password",
        "client_secret",
        "PASSWORD_HINT",
    ],
)
def test_built_in_sensitive_names(field: str) -> None:
    assert rules.BUILT_IN.is_sensitive("anything", field)


def test_tenant_marked_fields_are_sensitive_per_table_or_everywhere() -> None:
    assert TENANT_RULES.is_sensitive("contacts", "birth_date")
    assert not TENANT_RULES.is_sensitive("leads", "birth_date")
    assert TENANT_RULES.is_sensitive("leads", "salary")
    assert not TENANT_RULES.is_sensitive("contacts", "email")


def test_masking_reaches_custom_fields_and_keeps_nulls() -> None:
    masked = rules.mask_values(
        {"email": "a@b.io", "ssn": "123", "password": None, "custom_fields": {"salary": 10, "tier": "gold"}},
        "contacts",
        TENANT_RULES,
    )
    assert masked == {
        "email": "a@b.io",
        "ssn": rules.MASK,
        "password": None,
        "custom_fields": {"salary": rules.MASK, "tier": "gold"},
    }


def test_changed_fields_are_computed_by_value_not_by_key_set() -> None:
    old = {"name": "A", "score": 1, "tags": ["x"], "same": {"a": 1, "b": 2}}
    new = {"name": "B", "score": 1.0, "tags": ["x", "y"], "same": {"b": 2, "a": 1}, "added": None}
    # The seed's key-set comparison would report nothing here: both have the same keys but one.
    assert rules.changed_fields(old, new) == ["name", "tags"]


def test_field_changes_mask_sensitive_values_but_still_report_the_change() -> None:
    changes = rules.field_changes(
        {"ssn": "111", "email": "a@b.io", "custom_fields": {"salary": 1, "tier": "gold"}},
        {"ssn": "222", "email": "c@d.io", "custom_fields": {"salary": 2, "tier": "gold"}},
        "contacts",
        TENANT_RULES,
    )
    by_name = {c.field_name: c for c in changes}
    assert set(by_name) == {"ssn", "email", "custom_fields.salary"}
    assert by_name["ssn"].is_sensitive and by_name["ssn"].old_value == rules.MASK
    assert (
        by_name["custom_fields.salary"].is_sensitive
        and by_name["custom_fields.salary"].new_value == rules.MASK
    )
    assert by_name["email"].old_value == "a@b.io" and by_name["email"].field_type == "string"


def test_canonical_numbers_survive_a_jsonb_round_trip() -> None:
    # PostgreSQL gives 1e2 back as 100 and keeps 1.50 as 1.50; the digest must not change.
    assert rules.values_digest(rules.parse_json('{"a": 1e2, "b": 1.50, "c": 0.0}')) == rules.values_digest(
        rules.parse_json('{"b": 1.5, "a": 100, "c": 0}')
    )
    # A number and the string of it are different content.
    assert rules.values_digest({"a": 1}) != rules.values_digest({"a": "1"})


def entry(seq: int, prev: str, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": uuid.uuid4(),
        "chain_seq": seq,
        "prev_hash": prev,
        "event_id": uuid.uuid4(),
        "tenant_id": uuid.UUID(int=1),
        "service": "core_entity",
        "table_name": "contacts",
        "record_id": uuid.UUID(int=2),
        "operation": "UPDATE",
        "old_values": '{"name": "A"}',
        "new_values": '{"name": "B"}',
        "changed_fields": ["name"],
        "record_version": seq,
        "user_id": None,
        "user_email": None,
        "session_id": None,
        "ip_address": None,
        "user_agent": None,
        "api_endpoint": None,
        "request_id": None,
        "changed_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=seq),
        "erased_at": None,
        "old_values_digest": None,
        "new_values_digest": None,
    }
    row.update(overrides)
    row["entry_hash"] = rules.entry_hash(
        row,
        rules.values_digest(rules.parse_json(row["old_values"])),
        rules.values_digest(rules.parse_json(row["new_values"])),
    )
    return row


def chain(length: int) -> list[dict[str, Any]]:
    rows, previous = [], ""
    for seq in range(1, length + 1):
        rows.append(entry(seq, previous))
        previous = rows[-1]["entry_hash"]
    return rows


def test_an_intact_chain_verifies() -> None:
    verifier = rules.ChainVerifier(expected_seq=1, previous_hash="")
    verifier.feed(chain(5))
    assert verifier.broken is None and verifier.checked == 5


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda rows: rows[2].update(new_values='{"name": "X"}'), "content does not match its hash"),
        (lambda rows: rows[2].update(user_email="mallory@evil.io"), "content does not match its hash"),
        (lambda rows: rows.pop(2), "sequence gap"),
        (lambda rows: rows[2].update(prev_hash="0" * 64), "does not link to the previous entry"),
    ],
)
def test_tampering_is_reported_at_the_first_broken_entry(tamper: Any, reason: str) -> None:
    rows = chain(5)
    tamper(rows)
    verifier = rules.ChainVerifier(expected_seq=1, previous_hash="")
    verifier.feed(rows)
    assert verifier.broken is not None and verifier.broken.reason == reason
    assert verifier.broken.sequence == 3


def test_erased_values_verify_through_their_kept_digests() -> None:
    rows = chain(3)
    original = rows[1]
    rows[1] = {
        **original,
        "old_values": '{"name": "[erased]"}',
        "new_values": '{"name": "[erased]"}',
        "erased_at": dt.datetime.now(dt.UTC),
        "old_values_digest": rules.values_digest(rules.parse_json(original["old_values"])),
        "new_values_digest": rules.values_digest(rules.parse_json(original["new_values"])),
    }
    verifier = rules.ChainVerifier(expected_seq=1, previous_hash="")
    verifier.feed(rows)
    assert verifier.broken is None and verifier.erased == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_the_digest_of_values_is_the_digest_of_their_stored_text(values: dict[str, Any]) -> None:
    # The writer hashes the values it decoded; the verifier the JSON text it reads back.
    stored = json.dumps(values, sort_keys=True, separators=(",", ":"))
    assert rules.values_digest(values) == rules.values_digest(rules.parse_json(stored))


def test_masking_follows_each_tenants_marks_at_any_depth() -> None:
    values = {"ssn": "1", "birth_date": "2000-01-01", "custom_fields": {"salary": 5, "ok": "x"}, "n": None}
    assert rules.mask_values(values, "contacts", TENANT_RULES) == {
        "ssn": rules.MASK,
        "birth_date": rules.MASK,
        "custom_fields": {"salary": rules.MASK, "ok": "x"},
        "n": None,
    }
    # Another tenant's marks are another set of rules: nothing of the first is remembered.
    assert rules.mask_values(values, "contacts", rules.BUILT_IN) == {
        **values,
        "ssn": rules.MASK,
    }
