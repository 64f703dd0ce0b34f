"""Protobuf messages <-> column dicts for every core resource, driven by the entity specs.

Parsing never raises on bad client input: it collects a `FieldViolation` per unparsable field
(bad UUID, bad decimal, impossible date), so the servicer can report them together with the
rule violations found later.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.type import date_pb2

from services.core_entity.domain.model import EntitySpec, FieldSpec, Kind
from shared import fieldtypes, protoconv
from shared.errors import FieldViolation

# Free text whose surrounding whitespace may matter to the author.
_UNSTRIPPED = frozenset({"description", "next_step"})
ADDRESS_PARTS = ("street", "city", "region", "postal_code", "country")


def parse_uuid(value: str, field: str, violations: list[FieldViolation]) -> uuid.UUID | None:
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        violations.append(FieldViolation(field, "must be a UUID"))
        return None


def parse_decimal(value: str, field: str, violations: list[FieldViolation]) -> decimal.Decimal | None:
    text = value.strip()
    if not text:
        return None
    try:
        number = decimal.Decimal(text)
    except decimal.InvalidOperation:
        number = None
    if number is None or not number.is_finite():
        violations.append(FieldViolation(field, 'must be a decimal number such as "1234.50"'))
        return None
    return number


def parse_date(message: date_pb2.Date, field: str, violations: list[FieldViolation]) -> dt.date | None:
    try:
        return dt.date(message.year, message.month, message.day)
    except ValueError:
        violations.append(FieldViolation(field, "must be a valid calendar date"))
        return None


def date_message(value: dt.date) -> date_pb2.Date:
    return date_pb2.Date(year=value.year, month=value.month, day=value.day)


def _parse_field(spec: FieldSpec, message: Message, path: str, violations: list[FieldViolation]) -> Any:
    raw = getattr(message, spec.api)
    kind = spec.kind
    if kind is Kind.TEXT:
        text = raw if spec.api in _UNSTRIPPED else raw.strip()
        return text or None
    if kind is Kind.DECIMAL:
        return parse_decimal(raw, path, violations)
    if kind in (Kind.INT, Kind.BOOL):
        if spec.presence and not message.HasField(spec.api):
            return None
        return raw
    if kind is Kind.UUID:
        return parse_uuid(raw.strip(), path, violations)
    if kind is Kind.ADDRESS:
        if not message.HasField(spec.api):
            return None
        parts = {part: getattr(raw, part) for part in ADDRESS_PARTS if getattr(raw, part)}
        return parts or None
    if kind is Kind.TIMESTAMP:
        return protoconv.from_timestamp(raw) if message.HasField(spec.api) else None
    if kind is Kind.DATE:
        return parse_date(raw, path, violations) if message.HasField(spec.api) else None
    if kind is Kind.CUSTOM:
        return fieldtypes.values_from_proto(raw)
    raise AssertionError(f"unhandled kind {kind}")


def parse(
    spec: EntitySpec,
    message: Message,
    prefix: str,
    mask: Iterable[str] | None = None,
) -> tuple[dict[str, Any], list[FieldViolation]]:
    """The writable fields of `message` as column values (only the masked ones when a mask is
    given), and every field that could not be parsed or may not be written."""
    violations: list[FieldViolation] = []
    values: dict[str, Any] = {}
    writable = {f.api: f for f in spec.writable}
    custom_keys: set[str] | None = None
    if mask is None:
        chosen = list(writable.values())
    else:
        chosen = []
        for path in mask:
            if path in writable:
                chosen.append(writable[path])
            elif path.startswith("custom_fields.") and "custom_fields" in writable:
                custom_keys = (custom_keys or set()) | {path.removeprefix("custom_fields.")}
            else:
                violations.append(FieldViolation("update_mask", f"{path!r} is not a writable field"))
    for field_spec in chosen:
        values[field_spec.col] = _parse_field(field_spec, message, f"{prefix}.{field_spec.api}", violations)
    if custom_keys is not None and "custom_fields" not in values:
        given = message.custom_fields  # type: ignore[attr-defined]
        # custom_fields.<key> paths patch single keys; an absent key in the message removes it.
        values["custom_fields.patch"] = {
            key: fieldtypes.from_field_value(given[key]) if key in given else None for key in custom_keys
        }
    return values, violations


def render(
    spec: EntitySpec,
    row: Mapping[str, Any],
    message: Message,
    custom_types: Mapping[str, str] | None = None,
) -> Message:
    """Fills `message` from a stored row."""
    descriptor_fields = message.DESCRIPTOR.fields_by_name
    for field_spec in spec.fields:
        if field_spec.api not in descriptor_fields:
            continue
        value = row.get(field_spec.col)
        if value is None:
            continue
        kind = field_spec.kind
        api = field_spec.api
        if kind in (Kind.TEXT, Kind.INT, Kind.BOOL):
            setattr(message, api, value)
        elif kind is Kind.DECIMAL:
            setattr(message, api, format(value, "f"))
        elif kind is Kind.UUID:
            setattr(message, api, str(value))
        elif kind is Kind.ADDRESS:
            getattr(message, api).CopyFrom(
                json_format.ParseDict(
                    {k: v for k, v in value.items() if k in ADDRESS_PARTS},
                    type(getattr(message, api))(),
                )
            )
        elif kind is Kind.TIMESTAMP:
            stamp = protoconv.timestamp(value)
            assert stamp is not None
            getattr(message, api).CopyFrom(stamp)
        elif kind is Kind.DATE:
            getattr(message, api).CopyFrom(date_message(value))
        elif kind is Kind.CUSTOM:
            target = getattr(message, api)
            for key, item in value.items():
                if item is not None:
                    target[key].CopyFrom(fieldtypes.to_field_value(item, (custom_types or {}).get(key)))
    if "etag" in descriptor_fields:
        message.etag = protoconv.etag(row["version"])  # type: ignore[attr-defined]
    return message


def parse_etag(etag: str) -> int | None:
    """The version in an etag (W/"3", "3" or 3); None when empty; -1 when unreadable, which
    never matches, so a garbled etag is ABORTED like a stale one."""
    text = etag.strip()
    if not text:
        return None
    text = text.removeprefix("W/").strip('"')
    return int(text) if text.isdigit() else -1
