"""Pure rules: tenant fields, passwords, credentials, page tokens and change detection."""

from __future__ import annotations

import datetime as dt
import decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.tenant.domain import credentials, rules
from shared import paging
from shared.errors import InvalidArgument
from shared.events import changed_fields, to_json

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("subdomain", ["ab", "acme", "acme-corp", "a1", "x" * 100])
def test_good_subdomains(subdomain: str) -> None:
    assert rules.validate_tenant_fields("Acme", subdomain) == []


@pytest.mark.parametrize(
    "subdomain", ["", "a", "Acme", "-acme", "acme-", "ac_me", "ac me", "x" * 101, "ümlaut"]
)
def test_bad_subdomains_name_the_field(subdomain: str) -> None:
    (violation,) = rules.validate_tenant_fields("Acme", subdomain)
    assert violation.field == "tenant.subdomain"


@given(st.text(max_size=120))
def test_subdomain_rule_matches_the_seed_check(subdomain: str) -> None:
    ok = not rules.validate_tenant_fields("Acme", subdomain)
    seed_rule = bool(rules.SUBDOMAIN_PATTERN.match(subdomain)) and len(subdomain) <= 100
    assert ok == seed_rule


@pytest.mark.parametrize(
    ("password", "problem"),
    [("Short1", "8 characters"), ("alllowercase1", "upper-case"), ("NoDigitsHere", "digit")],
)
def test_password_policy(password: str, problem: str) -> None:
    (violation,) = rules.validate_password(password, "admin_password", rules.PasswordPolicy())
    assert problem in violation.description


def test_api_keys_are_hashed_and_checked_in_constant_time() -> None:
    key = credentials.issue_api_key()
    assert key.key_hash not in key.plaintext and key.salt not in key.plaintext
    parsed = credentials.parse_api_key(key.plaintext)
    assert parsed is not None
    prefix, secret = parsed
    assert prefix == key.prefix
    assert credentials.api_key_matches(secret, key.salt, key.key_hash)
    assert not credentials.api_key_matches(secret + "x", key.salt, key.key_hash)
    assert credentials.parse_api_key("Bearer nonsense") is None


def test_passwords_use_salted_slow_hashes() -> None:
    first, second = credentials.hash_password("Sup3rSecret"), credentials.hash_password("Sup3rSecret")
    assert first != second and first.startswith("$argon2id$")
    assert credentials.password_matches(first, "Sup3rSecret")
    assert not credentials.password_matches(first, "sup3rsecret")


def test_changed_fields_compare_values_not_key_sets() -> None:
    old = {"name": "Acme", "amount": decimal.Decimal("10.00"), "tags": ["a"], "gone": 1}
    new = {"name": "Acme", "amount": decimal.Decimal("10.50"), "tags": ["a", "b"], "added": 2}
    assert changed_fields(old, new) == ["added", "amount", "gone", "tags"]
    assert changed_fields(old, dict(old)) == []


def test_secret_columns_never_serialise() -> None:
    payload = to_json(
        {"email": "a@b.io", "password_hash": "x", "key_hash": "y", "salt": "z", "at": dt.date(2026, 1, 2)}
    )
    assert payload == '{"at":"2026-01-02","email":"a@b.io"}'


def test_page_tokens_round_trip_and_refuse_another_query() -> None:
    fingerprint = paging.query_fingerprint("x", "filter")
    token = paging.encode_token(["2026-01-01T00:00:00+00:00", "id"], fingerprint)
    assert paging.decode_token(token, fingerprint) == ["2026-01-01T00:00:00+00:00", "id"]
    with pytest.raises(InvalidArgument):
        paging.decode_token(token, paging.query_fingerprint("x", "other"))
    with pytest.raises(InvalidArgument):
        paging.decode_token("!!not-base64!!", fingerprint)


@pytest.mark.parametrize(("requested", "expected"), [(0, 50), (10, 10), (5000, 1000)])
def test_page_size_defaults_and_caps(requested: int, expected: int) -> None:
    assert paging.page_size(requested) == expected
