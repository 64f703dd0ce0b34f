"""Plain rules of the audit log: which fields are sensitive and how they are masked, which
fields changed (by value), the canonical form an entry is hashed in, and the hash chain.

No protobuf and no database here, so the rules are tested on their own and the writer and the
verifier cannot drift apart: both hash through `entry_hash`.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

MASK = "***"

# The seed's is_sensitive_field list plus the publishers' secret columns; names containing
# "password" or "secret" are sensitive too (password_confirmation, client_secret...).
SENSITIVE_NAMES = frozenset({"password", "secret", "ssn", "tax_id", "credit_card", "bank_account", "api_key"})
SENSITIVE_SUBSTRINGS = ("password", "secret")

# JSON objects whose keys are fields in their own right: custom field values on core entities
# and custom object records. Their keys get field-level history as "<container>.<key>".
FIELD_CONTAINERS = frozenset({"custom_fields", "record_data"})

OPERATIONS = ("INSERT", "UPDATE", "DELETE", "RESTORE")
GENESIS_HASH = ""


@dataclass(frozen=True, slots=True)
class SensitiveFields:
    """The built-in rule plus the fields one tenant marked, per table ("*" for every table)."""

    marked: frozenset[tuple[str, str]] = frozenset()

    def is_sensitive(self, table: str, field: str) -> bool:
        name = field.lower()
        return (
            name in SENSITIVE_NAMES
            or any(part in name for part in SENSITIVE_SUBSTRINGS)
            or (table, field) in self.marked
            or ("*", field) in self.marked
        )


class _Sensitivity(dict[str, bool]):
    """Which fields of one table are sensitive under one set of rules, worked out on first sight:
    every stored value is checked, and a log has few distinct fields."""

    def __init__(self, rules: SensitiveFields, table: str) -> None:
        super().__init__()
        self._rules = rules
        self._table = table

    def __missing__(self, field: str) -> bool:
        found = self[field] = self._rules.is_sensitive(self._table, field)
        return found


@functools.lru_cache(maxsize=1024)
def _sensitivity(rules: SensitiveFields, table: str) -> _Sensitivity:
    return _Sensitivity(rules, table)


BUILT_IN = SensitiveFields()


def mask_values(
    values: Mapping[str, Any] | None, table: str, rules: SensitiveFields
) -> dict[str, Any] | None:
    """A copy with every sensitive value replaced by MASK, at any depth (a custom field named
    `ssn` inside `custom_fields` is as sensitive as a column)."""
    if values is None:
        return None
    sensitive = _sensitivity(rules, table)
    return {key: _mask_value(key, value, sensitive) for key, value in values.items()}


def _mask_value(key: str, value: Any, sensitive: _Sensitivity) -> Any:
    if sensitive[key]:
        return None if value is None else MASK
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, Mapping):
        return {k: _mask_value(k, v, sensitive) for k, v in value.items()}
    if isinstance(value, list):
        return [
            {k: _mask_value(k, v, sensitive) for k, v in item.items()} if isinstance(item, Mapping) else item
            for item in value
        ]
    return value


def _same(a: Any, b: Any) -> bool:
    # Compared as canonical JSON: 1 and 1.0 are the same number, key order does not matter.
    return canonical_json(a) == canonical_json(b)


def flatten(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """Top-level fields, with the keys of custom field containers as fields of their own."""
    flat: dict[str, Any] = {}
    for key, value in (values or {}).items():
        if key in FIELD_CONTAINERS and isinstance(value, Mapping):
            for inner, inner_value in value.items():
                flat[f"{key}.{inner}"] = inner_value
        else:
            flat[key] = value
    return flat


def changed_fields(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> list[str]:
    """Top-level fields whose values differ, by value over the union of keys. (The seed's
    create_audit_log compares key sets only, so it misses every changed value.)"""
    old, new = old or {}, new or {}
    return sorted(key for key in set(old) | set(new) if not _same(old.get(key), new.get(key)))


@dataclass(frozen=True, slots=True)
class FieldChange:
    field_name: str
    old_value: str | None
    new_value: str | None
    field_type: str
    is_sensitive: bool


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float | Decimal):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    return "array"


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def field_changes(
    old: Mapping[str, Any] | None, new: Mapping[str, Any] | None, table: str, rules: SensitiveFields
) -> list[FieldChange]:
    """One entry per changed field (custom fields one by one), values masked when sensitive.
    Computed from the unmasked values, so a changed password still shows as changed."""
    flat_old, flat_new = flatten(old), flatten(new)
    changes = []
    for name in sorted(set(flat_old) | set(flat_new)):
        before, after = flat_old.get(name), flat_new.get(name)
        if _same(before, after):
            continue
        leaf = name.rsplit(".", 1)[-1]
        sensitive = rules.is_sensitive(table, leaf) or rules.is_sensitive(table, name)
        changes.append(
            FieldChange(
                field_name=name[:200],
                old_value=(MASK if before is not None else None) if sensitive else _as_text(before),
                new_value=(MASK if after is not None else None) if sensitive else _as_text(after),
                field_type=_json_type(after if after is not None else before),
                is_sensitive=sensitive,
            )
        )
    return changes


# --- canonical content and the chain ---------------------------------------------------------


def _canonical(value: Any) -> Any:
    # Strings and numbers are tagged so that neither can pose as the other, and numbers are
    # normalised so that what PostgreSQL's jsonb gives back (1E+2 -> 100) hashes the same.
    if type(value) is dict:  # the common case first, its text values without a call each
        return {
            k if type(k) is str else str(k): "s:" + v if type(v) is str else _canonical(v)
            for k, v in value.items()
        }
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return "s:" + value
    if isinstance(value, int | float | Decimal):
        number = Decimal(str(value)).normalize()
        return "n:" + ("0" if number.is_zero() else format(number, "E"))
    if isinstance(value, dict) or isinstance(value, Mapping):  # dict first: the ABC check is slow
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    raise TypeError(f"cannot canonicalise {type(value).__name__}")


def canonical_json(value: Any) -> str:
    return json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def parse_json(text: str | None) -> Any:
    """Parses stored JSON with exact numbers (Decimal), so hashing never goes through floats."""
    if text is None:
        return None
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


def values_digest(values: Any) -> str:
    """The digest of old or new values; what the chain covers, so erasing values for a data
    subject (keeping the digest) does not break the chain."""
    return hashlib.sha256(canonical_json(values).encode()).hexdigest()


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _time(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="microseconds")


def entry_hash(entry: Mapping[str, Any], old_digest: str, new_digest: str) -> str:
    """SHA-256 of an entry's canonical content (sorted-key JSON of its stored fields) including
    its position and the previous entry's hash."""
    content = {
        "chain_seq": int(entry["chain_seq"]),
        "prev_hash": entry["prev_hash"] or "",
        "event_id": _text(entry["event_id"]),
        "tenant_id": _text(entry["tenant_id"]),
        "service": entry["service"],
        "table_name": entry["table_name"],
        "record_id": _text(entry["record_id"]),
        "operation": entry["operation"],
        "old_values": old_digest,
        "new_values": new_digest,
        "changed_fields": list(entry["changed_fields"] or []),
        "record_version": int(entry["record_version"]),
        "user_id": _text(entry["user_id"]),
        "user_email": entry["user_email"],
        "session_id": entry["session_id"],
        "ip_address": _text(entry["ip_address"]),
        "user_agent": entry["user_agent"],
        "api_endpoint": entry["api_endpoint"],
        "request_id": entry["request_id"],
        "changed_at": _time(entry["changed_at"]),
    }
    return hashlib.sha256(canonical_json(content).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ChainBreak:
    sequence: int
    entry_id: str
    reason: str


@dataclass
class ChainVerifier:
    """Walks a tenant's entries in chain order and remembers the first break."""

    expected_seq: int | None = None
    previous_hash: str | None = None
    checked: int = 0
    erased: int = 0
    broken: ChainBreak | None = None

    def feed(self, entries: Iterable[Mapping[str, Any]]) -> None:
        for entry in entries:
            if self.broken is not None:
                return
            self._check(entry)

    def _check(self, entry: Mapping[str, Any]) -> None:
        seq = int(entry["chain_seq"])
        entry_id = str(entry["id"])
        self.checked += 1
        if self.expected_seq is not None and seq != self.expected_seq:
            self.broken = ChainBreak(self.expected_seq, entry_id, "sequence gap")
            return
        if self.previous_hash is not None and (entry["prev_hash"] or "") != self.previous_hash:
            self.broken = ChainBreak(seq, entry_id, "does not link to the previous entry")
            return
        if entry["erased_at"] is not None:
            self.erased += 1
            old_digest = entry["old_values_digest"] or ""
            new_digest = entry["new_values_digest"] or ""
        else:
            old_digest = values_digest(parse_json(entry["old_values"]))
            new_digest = values_digest(parse_json(entry["new_values"]))
        if entry_hash(entry, old_digest, new_digest) != entry["entry_hash"]:
            self.broken = ChainBreak(seq, entry_id, "content does not match its hash")
            return
        self.expected_seq = seq + 1
        self.previous_hash = entry["entry_hash"]
