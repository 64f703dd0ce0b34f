"""Tenant-service rules without a database: sign-in lockout, password policy from metadata,
session tokens, encryption at rest, the shard guard's decisions and the move's table order."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.tenant.adapters.secrets_box import SecretBox
from services.tenant.domain import credentials, rules
from services.tenant.domain.moves import TableInfo, copy_order, rows_vanished
from shared import shard_guard
from shared.errors import Unavailable
from shared.events import to_json

pytestmark = pytest.mark.unit


def test_five_failures_in_a_row_lock_and_restart_the_count() -> None:
    count = 0
    for attempt in range(1, 5):
        outcome = rules.after_failed_sign_in(count, threshold=5)
        assert not outcome.lock, attempt
        count = outcome.failed_count
    assert count == 4
    fifth = rules.after_failed_sign_in(count, threshold=5)
    assert fifth.lock and fifth.failed_count == 0


def test_password_policy_reads_the_seed_keys() -> None:
    policy = rules.password_policy_from(
        {"min_length": 12, "require_uppercase": False, "require_numbers": True}
    )
    assert policy == rules.PasswordPolicy(min_length=12, require_uppercase=False, require_digit=True)
    assert rules.password_policy_from(None) == rules.PasswordPolicy()
    assert rules.validate_password("abcdefghij1", "password", policy)  # 11 < 12
    assert not rules.validate_password("abcdefghijk1", "password", policy)


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("strict", "system_metadata.value"),
        ({"min_length": 0}, "system_metadata.value.min_length"),
        ({"min_length": 8.5}, "system_metadata.value.min_length"),
        ({"require_uppercase": "yes"}, "system_metadata.value.require_uppercase"),
    ],
)
def test_bad_password_policies_name_the_field(value: object, field: str) -> None:
    violations = rules.validate_password_policy(value, "system_metadata.value")
    assert field in {v.field for v in violations}


@pytest.mark.parametrize(
    ("password", "problem"),
    [("Short1", "at least 8"), ("alllowercase1", "upper-case"), ("NoDigitsHere", "digit")],
)
def test_weak_passwords_are_refused(password: str, problem: str) -> None:
    (violation,) = rules.validate_password(password, "password", rules.PasswordPolicy())
    assert violation.field == "password" and problem in violation.description


def test_session_tokens_are_hashed_and_never_mistaken_for_api_keys() -> None:
    issued = credentials.issue_session_token()
    assert issued.plaintext.startswith("crms_")
    prefix, secret = credentials.parse_session_token(issued.plaintext) or ("", "")
    assert prefix == issued.prefix and len(prefix) == 16
    assert secret not in issued.token_hash
    assert credentials.token_matches(secret, issued.salt, issued.token_hash)
    assert not credentials.token_matches(secret + "x", issued.salt, issued.token_hash)
    assert credentials.parse_api_key(issued.plaintext) is None
    key = credentials.issue_api_key()
    assert credentials.parse_session_token(key.plaintext) is None


@pytest.mark.parametrize("scopes", [["read"], ["read", "write", "admin"], ["write"]])
def test_known_scopes_pass(scopes: list[str]) -> None:
    assert rules.validate_scopes(scopes, "api_key.scopes") == []


def test_unknown_scopes_name_the_field() -> None:
    (violation,) = rules.validate_scopes(["read", "superuser"], "api_key.scopes")
    assert violation.field == "api_key.scopes" and "superuser" in violation.description


@given(st.text(min_size=1, max_size=120))
def test_configuration_names_are_lower_snake_case_or_refused(name: str) -> None:
    violations = rules.validate_name(name, "configuration.key", 100, rules.CONFIG_NAME_PATTERN)
    good = len(name) <= 100 and rules.CONFIG_NAME_PATTERN.match(name) is not None
    assert (violations == []) == good
    assert all(v.field == "configuration.key" for v in violations)


def test_encrypted_values_round_trip_and_hide_the_plaintext() -> None:
    box = SecretBox("", fallback_secret="internal-token")
    token = box.encrypt_json({"api_key": "sendgrid-secret"})
    assert "sendgrid-secret" not in token
    assert box.decrypt_json(token) == {"api_key": "sendgrid-secret"}
    # Another key cannot read it (authenticated encryption), and says so plainly.
    with pytest.raises(RuntimeError, match="cannot be decrypted"):
        SecretBox("", fallback_secret="another-token").decrypt_json(token)


def test_secret_columns_of_the_tenant_service_never_reach_events() -> None:
    row = {
        "id": "1",
        "password_hash": "$argon2id$...",
        "key_hash": "abc",
        "salt": "s",
        "token_hash": "t",
        "encrypted_value": "gAAAA...",
        "config_value": None,
    }
    assert json.loads(to_json(row)) == {"id": "1", "config_value": None}


def test_shard_guard_serves_active_members_at_their_epoch() -> None:
    shard_guard.decide((3, "active"), 3, is_write=True)
    shard_guard.decide((3, "active"), None, is_write=True)  # internal call without an epoch
    shard_guard.decide((3, "blocked"), 3, is_write=False)  # reads go on during the block


@pytest.mark.parametrize(
    ("row", "epoch", "is_write", "reason"),
    [
        (None, 1, False, "TENANT_NOT_ON_SHARD"),
        ((2, "active"), 1, False, "STALE_SHARD_EPOCH"),
        ((2, "active"), 3, True, "STALE_SHARD_EPOCH"),
        ((2, "blocked"), 2, True, "TENANT_WRITE_BLOCKED"),
        ((2, "incoming"), 2, False, "TENANT_NOT_ON_SHARD"),
        ((3, "moved_out"), 3, False, "TENANT_NOT_ON_SHARD"),
    ],
)
def test_shard_guard_refusals_are_retryable(
    row: tuple[int, str] | None, epoch: int, is_write: bool, reason: str
) -> None:
    with pytest.raises(Unavailable) as caught:
        shard_guard.decide(row, epoch, is_write)
    assert caught.value.reason == reason


def table(name: str, *deps: str) -> TableInfo:
    return TableInfo("core", name, ("tenant_id", "id"), ("id",), frozenset(f"core.{d}" for d in deps))


def test_tables_are_copied_parents_first() -> None:
    tables = [table("deals", "accounts", "pipelines"), table("accounts", "accounts"), table("pipelines")]
    order = [t.name for t in copy_order(tables)]
    assert order.index("accounts") < order.index("deals")
    assert order.index("pipelines") < order.index("deals")


def test_a_cycle_between_tables_still_yields_every_table_once() -> None:
    order = copy_order([table("a", "b"), table("b", "a"), table("c")])
    assert sorted(t.name for t in order) == ["a", "b", "c"]


def test_no_rows_vanished_when_the_count_is_the_known_rows_plus_the_new_ones() -> None:
    known = {"1", "2", "3"}
    # "2" was updated and "4" inserted since: four rows, nothing deleted.
    assert not rows_vanished(known, {"2", "4"}, 4)
    assert not rows_vanished(known, set(), 3)


def test_a_deletion_shows_in_the_count_even_beside_an_insert() -> None:
    known = {"1", "2", "3"}
    assert rows_vanished(known, set(), 2)
    # One deleted, one inserted: three rows, as before, but one more was expected.
    assert rows_vanished(known, {"4"}, 3)
