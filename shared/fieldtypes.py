"""The one validator for custom field values, shared by the custom-object and core-entity services.

Custom field values live beside their record (`custom_fields` JSONB on core entities,
`record_data` JSONB on custom object records); their definitions live in the custom-object
service. Both services validate values here, so a field type behaves the same everywhere.

How to use it::

    from shared.fieldtypes import FieldDefinition, PicklistOption, clean_values, values_from_proto

    definitions = [
        FieldDefinition("budget", "currency", rules={"min_value": "0"}),
        FieldDefinition("status", "picklist", required=True,
                        options=(PicklistOption("planning", is_default=True), PicklistOption("done"))),
    ]
    raw = values_from_proto(request.custom_fields)          # map<string, FieldValue> -> python
    stored = clean_values(raw, definitions)                 # raises InvalidArgument, or:
    result = validate_values(raw, definitions, partial=True)  # .values / .violations, no raise
    response.custom_fields.update(values_to_proto(stored, definitions))

What `validate_values` does, for every key:

- unknown keys (no active definition) are violations ``custom_fields.<name>: is not a field ...``;
- each value is checked and normalised by its field type and the field's rules (merged over the
  seed's defaults, see `FIELD_TYPES`); every violation names the field and the rule;
- on create (``partial=False``) a missing key gets the field's default (an explicit default, or
  the picklist options marked default), and a required field still without a value is a
  violation; on update (``partial=True``) only the given keys are checked, no defaults are
  applied, and clearing a required field (``None``) is a violation;
- ``None`` means "no value" and is dropped from the cleaned result.

It does not check `unique` (that needs the database: the owning service enforces it with a
partial unique index) nor that a lookup target exists (that needs the target's service).

Cleaned values are JSON-ready and canonical, so typed expression indexes can cast them:

=================================  ===============================================
field type                         stored JSON value
=================================  ===============================================
text, textarea, email, phone, url  string
picklist                           string (an active option's value)
multipicklist                      list of distinct strings (active option values)
number                             integer
decimal, currency, percent         string with exactly two decimals, e.g. "1234.50"
date                               string "YYYY-MM-DD"
datetime                           string "YYYY-MM-DDTHH:MM:SS.ffffff+00:00" (UTC)
boolean                            true / false
lookup, master_detail              string: the canonical lowercase UUID
=================================  ===============================================

Accepted inputs are lenient where the meaning is unambiguous: decimals as `Decimal`, `int`,
`str` (or `float`, through its shortest repr), numbers as `int` or an integer string, dates and
datetimes as objects or ISO strings (a datetime without an offset is refused), booleans as
`bool`. Floats are never stored: decimals travel as strings.

Tenant-supplied patterns are compiled with RE2 (linear-time, no backtracking), so a pattern can
never hang the service; a pattern RE2 cannot compile within its memory budget is rejected when
the field is defined.
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import re2
from google.protobuf import timestamp_pb2
from google.type import date_pb2

from crm.v1 import common_pb2
from shared.errors import FieldViolation, InvalidArgument

#: Object types of the core-entity service that can carry custom fields.
CORE_OBJECT_TYPES: Final = ("account", "contact", "lead", "deal", "activity")

#: The prefix of violation paths for values, e.g. ``custom_fields.budget``.
DEFAULT_PREFIX: Final = "custom_fields"

#: Longest tenant pattern accepted, in characters.
MAX_PATTERN_LENGTH: Final = 1000
#: RE2 memory budget per compiled pattern; a pattern that needs more is rejected.
PATTERN_MAX_MEM: Final = 1 << 20

_INT32_MIN: Final = -2_147_483_648
_INT32_MAX: Final = 2_147_483_647
_TWO_PLACES: Final = decimal.Decimal("0.01")


@dataclass(frozen=True, slots=True)
class FieldTypeSpec:
    """What the seed's field type specification says about one field type."""

    #: The column-like data type the seed pairs with the field type (`data_type`).
    data_type: str
    #: Validation rules a definition may set for this type.
    allowed_rules: frozenset[str]
    #: The seed's default rules, merged under the definition's own rules.
    default_rules: Mapping[str, Any]
    #: Hard limits the definition's rules cannot widen (same keys as default rules).
    hard_limits: Mapping[str, Any] = field(default_factory=dict)
    #: A pattern the type always enforces, in addition to a tenant pattern.
    builtin_pattern: str | None = None
    #: Picklist types need options.
    requires_options: bool = False
    #: Decimal types: total digits and digits after the point.
    precision: int | None = None
    scale: int | None = None


_LENGTH = frozenset({"min_length", "max_length", "pattern"})
_VALUE = frozenset({"min_value", "max_value"})
_DATE = frozenset({"min_date", "max_date"})

#: Every field type of the seed with its data type, rules and limits.
FIELD_TYPES: Final[Mapping[str, FieldTypeSpec]] = {
    "text": FieldTypeSpec("varchar", _LENGTH, {"min_length": 0, "max_length": 255}, {"max_length": 255}),
    "textarea": FieldTypeSpec("text", _LENGTH, {"min_length": 0, "max_length": 32768}, {"max_length": 32768}),
    "number": FieldTypeSpec(
        "integer",
        _VALUE,
        {"min_value": _INT32_MIN, "max_value": _INT32_MAX},
        {"min_value": _INT32_MIN, "max_value": _INT32_MAX},
    ),
    "decimal": FieldTypeSpec(
        "decimal",
        _VALUE,
        {"min_value": "-999999999999.99", "max_value": "999999999999.99"},
        {"min_value": "-9999999999999.99", "max_value": "9999999999999.99"},
        precision=15,
        scale=2,
    ),
    "currency": FieldTypeSpec(
        "decimal",
        _VALUE,
        {"min_value": "-999999999999.99", "max_value": "999999999999.99"},
        {"min_value": "-9999999999999.99", "max_value": "9999999999999.99"},
        precision=15,
        scale=2,
    ),
    "percent": FieldTypeSpec(
        "decimal",
        _VALUE,
        {"min_value": "0", "max_value": "100"},
        {"min_value": "-999.99", "max_value": "999.99"},
        precision=5,
        scale=2,
    ),
    "date": FieldTypeSpec(
        "date",
        _DATE,
        {"min_date": "1900-01-01", "max_date": "2100-12-31"},
        {"min_date": "0001-01-01", "max_date": "9999-12-31"},
    ),
    "datetime": FieldTypeSpec(
        "timestamp",
        _DATE,
        {"min_date": "1900-01-01", "max_date": "2100-12-31"},
        {"min_date": "0001-01-02", "max_date": "9999-12-30"},
    ),
    "boolean": FieldTypeSpec("boolean", frozenset(), {}),
    "picklist": FieldTypeSpec("varchar", frozenset(), {}, requires_options=True),
    "multipicklist": FieldTypeSpec(
        "jsonb",
        frozenset({"max_selections"}),
        {"max_selections": 10},
        {"max_selections": 100},
        requires_options=True,
    ),
    "email": FieldTypeSpec(
        "varchar",
        _LENGTH,
        {"min_length": 0, "max_length": 255},
        {"max_length": 255},
        builtin_pattern=r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$",
    ),
    "phone": FieldTypeSpec(
        "varchar",
        _LENGTH,
        {"min_length": 0, "max_length": 50},
        {"max_length": 50},
        builtin_pattern=r"^[+]?[0-9\s\-\(\)]{7,20}$",
    ),
    "url": FieldTypeSpec(
        "varchar",
        _LENGTH,
        {"min_length": 0, "max_length": 2048},
        {"max_length": 2048},
        builtin_pattern=r"^https?:\/\/.+",
    ),
    "lookup": FieldTypeSpec("uuid", frozenset(), {}),
    "master_detail": FieldTypeSpec("uuid", frozenset(), {}),
}

#: Field types whose value references another record.
REFERENCE_TYPES: Final = frozenset({"lookup", "master_detail"})
#: Field types stored as a canonical decimal string.
DECIMAL_TYPES: Final = frozenset({"decimal", "currency", "percent"})
#: Field types stored as a plain string.
STRING_TYPES: Final = frozenset({"text", "textarea", "email", "phone", "url", "picklist"})


def data_type_for(field_type: str) -> str:
    """The data type a field type implies (the seed pairs them one to one)."""
    return FIELD_TYPES[field_type].data_type


@dataclass(frozen=True, slots=True)
class PicklistOption:
    """One option of a picklist or multipicklist field."""

    value: str
    label: str = ""
    order: int = 0
    is_default: bool = False
    is_active: bool = True


@dataclass(frozen=True, slots=True)
class FieldDefinition:
    """A custom field as the validator needs it; plain data, no protobuf, no database."""

    #: The field's api name: the key in `custom_fields` / `record_data`.
    name: str
    #: One of `FIELD_TYPES`.
    field_type: str
    required: bool = False
    #: Enforced by the owning service's partial unique index, not here.
    unique: bool = False
    #: The default as a value this module accepts (cleaned before use); None for no default.
    default: Any = None
    #: Validation rules, merged over the type's defaults (see `FIELD_TYPES`).
    rules: Mapping[str, Any] = field(default_factory=dict)
    #: Picklist and multipicklist options.
    options: tuple[PicklistOption, ...] = ()
    #: Lookup and master_detail: the object type referenced (core type or custom api_name).
    reference_to: str | None = None
    #: Inactive fields accept no values and are neither required nor defaulted.
    is_active: bool = True


@dataclass(slots=True)
class ValidationResult:
    """Cleaned values, or the violations that prevented them."""

    values: dict[str, Any]
    violations: list[FieldViolation]

    @property
    def ok(self) -> bool:
        return not self.violations

    def raise_for_violations(self) -> dict[str, Any]:
        if self.violations:
            raise InvalidArgument(self.violations)
        return self.values


class _Bad(ValueError):
    """A value breaks a rule; the message names the rule."""


# --- rules -----------------------------------------------------------------------------------


def effective_rules(definition: FieldDefinition) -> dict[str, Any]:
    """The definition's rules merged over its type's defaults."""
    spec = FIELD_TYPES[definition.field_type]
    merged = dict(spec.default_rules)
    merged.update({k: v for k, v in definition.rules.items() if v is not None})
    return merged


@functools.lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> Any:
    """Compiles a pattern with RE2 (linear time); raises ValueError when it is not acceptable."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"must be at most {MAX_PATTERN_LENGTH} characters")
    options = re2.Options()
    options.log_errors = False
    options.max_mem = PATTERN_MAX_MEM
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(f"is not a supported regular expression (RE2 syntax): {detail}") from exc


def _as_decimal(value: Any) -> decimal.Decimal:
    if isinstance(value, bool):
        raise _Bad("must be a decimal number, not a boolean")
    if isinstance(value, decimal.Decimal):
        number = value
    elif isinstance(value, int):
        number = decimal.Decimal(value)
    elif isinstance(value, float):
        number = decimal.Decimal(repr(value))
    elif isinstance(value, str):
        try:
            number = decimal.Decimal(value.strip())
        except decimal.InvalidOperation as exc:
            raise _Bad('must be a decimal number such as "1234.50"') from exc
    else:
        raise _Bad("must be a decimal number")
    if not number.is_finite():
        raise _Bad("must be a finite decimal number")
    return number


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Bad("must be an integer, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, decimal.Decimal) and value.is_finite() and value == value.to_integral_value():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("+-").isdigit() and len(text) <= 25:
            return int(text)
    raise _Bad("must be an integer")


def _as_date(value: Any) -> dt.date:
    if isinstance(value, dt.datetime):
        raise _Bad("must be a date without a time")
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError as exc:
            raise _Bad("must be a date in the form YYYY-MM-DD") from exc
    raise _Bad("must be a date in the form YYYY-MM-DD")


def _as_datetime(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        stamp = value
    elif isinstance(value, str):
        try:
            stamp = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError as exc:
            raise _Bad("must be an ISO 8601 date and time with a UTC offset") from exc
    else:
        raise _Bad("must be an ISO 8601 date and time with a UTC offset")
    if stamp.tzinfo is None or stamp.utcoffset() is None:
        raise _Bad("must carry a UTC offset (e.g. 2026-01-31T09:00:00Z)")
    return stamp.astimezone(dt.UTC)


def _rule_violations(definition: FieldDefinition, path: str) -> list[FieldViolation]:
    """Violations in the definition's own rules (unknown keys, bad bounds, bad pattern)."""
    spec = FIELD_TYPES[definition.field_type]
    out: list[FieldViolation] = []
    for key in sorted(definition.rules):
        if key not in spec.allowed_rules:
            allowed = ", ".join(sorted(spec.allowed_rules)) or "none"
            out.append(
                FieldViolation(
                    f"{path}.{key}",
                    f"is not a rule of {definition.field_type} fields (allowed: {allowed})",
                )
            )
    if out:
        return out
    rules = effective_rules(definition)
    limits = spec.hard_limits
    try:
        if "min_length" in spec.allowed_rules:
            low, high = _as_int(rules["min_length"]), _as_int(rules["max_length"])
            if low < 0:
                out.append(FieldViolation(f"{path}.min_length", "must not be negative"))
            if high < 1 or high > limits["max_length"]:
                out.append(
                    FieldViolation(f"{path}.max_length", f"must be between 1 and {limits['max_length']}")
                )
            if low > high:
                out.append(FieldViolation(f"{path}.min_length", "must not exceed max_length"))
            if "pattern" in rules:
                pattern = rules["pattern"]
                if not isinstance(pattern, str) or not pattern:
                    out.append(FieldViolation(f"{path}.pattern", "must be a non-empty string"))
                else:
                    try:
                        compile_pattern(pattern)
                    except ValueError as exc:
                        out.append(FieldViolation(f"{path}.pattern", str(exc)))
        if "min_value" in spec.allowed_rules:
            as_number = _as_int if definition.field_type == "number" else _as_decimal
            low_value, high_value = as_number(rules["min_value"]), as_number(rules["max_value"])
            floor, ceiling = as_number(limits["min_value"]), as_number(limits["max_value"])
            for key, bound in (("min_value", low_value), ("max_value", high_value)):
                if not floor <= bound <= ceiling:
                    out.append(FieldViolation(f"{path}.{key}", f"must be between {floor} and {ceiling}"))
            if low_value > high_value:
                out.append(FieldViolation(f"{path}.min_value", "must not exceed max_value"))
        if "min_date" in spec.allowed_rules:
            low_date, high_date = _as_date(rules["min_date"]), _as_date(rules["max_date"])
            if low_date > high_date:
                out.append(FieldViolation(f"{path}.min_date", "must not be after max_date"))
            if low_date < _as_date(limits["min_date"]) or high_date > _as_date(limits["max_date"]):
                out.append(
                    FieldViolation(
                        f"{path}.min_date",
                        f"dates must lie between {limits['min_date']} and {limits['max_date']}",
                    )
                )
        if "max_selections" in spec.allowed_rules:
            count = _as_int(rules["max_selections"])
            if not 1 <= count <= limits["max_selections"]:
                out.append(
                    FieldViolation(
                        f"{path}.max_selections", f"must be between 1 and {limits['max_selections']}"
                    )
                )
    except _Bad as exc:
        out.append(FieldViolation(path, f"a rule value is malformed: {exc}"))
    return out


def validate_definition(definition: FieldDefinition, path: str = "field") -> list[FieldViolation]:
    """Violations in a field definition: type, rules, options and default.

    Paths name the part of the definition: ``<path>.field_type``, ``<path>.validation_rules.<rule>``,
    ``<path>.options[<i>].value``, ``<path>.default_value``.
    """
    if definition.field_type not in FIELD_TYPES:
        return [FieldViolation(f"{path}.field_type", f"must be one of {', '.join(sorted(FIELD_TYPES))}")]
    spec = FIELD_TYPES[definition.field_type]
    out = _rule_violations(definition, f"{path}.validation_rules")
    if spec.requires_options:
        if not any(o.is_active for o in definition.options):
            out.append(
                FieldViolation(
                    f"{path}.options", f"{definition.field_type} fields need at least one active option"
                )
            )
        seen_values: set[str] = set()
        seen_orders: set[int] = set()
        for i, option in enumerate(definition.options):
            if not option.value or len(option.value) > 255:
                out.append(FieldViolation(f"{path}.options[{i}].value", "must be 1 to 255 characters"))
            if option.value in seen_values:
                out.append(FieldViolation(f"{path}.options[{i}].value", "is not unique in this field"))
            if option.order in seen_orders:
                out.append(FieldViolation(f"{path}.options[{i}].order", "is not unique in this field"))
            if len(option.label) > 255:
                out.append(FieldViolation(f"{path}.options[{i}].label", "must be at most 255 characters"))
            seen_values.add(option.value)
            seen_orders.add(option.order)
        defaults = [o for o in definition.options if o.is_default]
        if definition.field_type == "picklist" and len(defaults) > 1:
            out.append(FieldViolation(f"{path}.options", "a picklist has at most one default option"))
    elif definition.options:
        out.append(FieldViolation(f"{path}.options", f"{definition.field_type} fields take no options"))
    if definition.field_type in REFERENCE_TYPES and definition.default is not None:
        out.append(FieldViolation(f"{path}.default_value", "lookup fields have no default"))
    elif definition.default is not None and not out:
        try:
            _clean_one(definition, definition.default)
        except _Bad as exc:
            out.append(FieldViolation(f"{path}.default_value", str(exc)))
    return out


def default_for(definition: FieldDefinition) -> Any:
    """The field's default as a cleaned value, or None: an explicit default first, then the
    options marked default (picklists take the first, multipicklists all of them)."""
    if definition.default is not None:
        return _clean_one(definition, definition.default)
    if definition.field_type in ("picklist", "multipicklist"):
        marked = [
            o.value for o in sorted(definition.options, key=lambda o: o.order) if o.is_default and o.is_active
        ]
        if marked:
            return marked[0] if definition.field_type == "picklist" else marked
    return None


# --- values ----------------------------------------------------------------------------------


def _check_length(text: str, rules: Mapping[str, Any]) -> None:
    if len(text) < int(rules["min_length"]):
        raise _Bad(f"must be at least {rules['min_length']} characters (min_length)")
    if len(text) > int(rules["max_length"]):
        raise _Bad(f"must be at most {rules['max_length']} characters (max_length)")


def _clean_one(definition: FieldDefinition, value: Any) -> Any:
    """One non-null value, checked and normalised; raises _Bad naming the rule it breaks."""
    kind = definition.field_type
    spec = FIELD_TYPES[kind]
    rules = effective_rules(definition)
    if kind in ("text", "textarea", "email", "phone", "url"):
        if not isinstance(value, str):
            raise _Bad("must be a string")
        _check_length(value, rules)
        if spec.builtin_pattern is not None and not compile_pattern(spec.builtin_pattern).search(value):
            raise _Bad(f"is not a valid {kind} (pattern)")
        pattern = rules.get("pattern")
        if pattern and not compile_pattern(pattern).search(value):
            raise _Bad("does not match the field's pattern (pattern)")
        return value
    if kind == "number":
        number = _as_int(value)
        if number < int(rules["min_value"]):
            raise _Bad(f"must be at least {rules['min_value']} (min_value)")
        if number > int(rules["max_value"]):
            raise _Bad(f"must be at most {rules['max_value']} (max_value)")
        return number
    if kind in DECIMAL_TYPES:
        amount = _as_decimal(value)
        assert spec.scale is not None and spec.precision is not None
        exponent = amount.normalize().as_tuple().exponent
        if isinstance(exponent, int) and exponent < -spec.scale:
            raise _Bad(f"must have at most {spec.scale} decimal places (scale)")
        if amount < _as_decimal(rules["min_value"]):
            raise _Bad(f"must be at least {rules['min_value']} (min_value)")
        if amount > _as_decimal(rules["max_value"]):
            raise _Bad(f"must be at most {rules['max_value']} (max_value)")
        quantized = amount.quantize(_TWO_PLACES)
        if len(quantized.as_tuple().digits) > spec.precision:
            raise _Bad(f"must have at most {spec.precision} digits (precision)")
        return format(quantized, "f")
    if kind == "date":
        day = _as_date(value)
        if day < _as_date(rules["min_date"]):
            raise _Bad(f"must be on or after {rules['min_date']} (min_date)")
        if day > _as_date(rules["max_date"]):
            raise _Bad(f"must be on or before {rules['max_date']} (max_date)")
        return day.isoformat()
    if kind == "datetime":
        stamp = _as_datetime(value)
        if stamp.date() < _as_date(rules["min_date"]):
            raise _Bad(f"must be on or after {rules['min_date']} (min_date)")
        if stamp.date() > _as_date(rules["max_date"]):
            raise _Bad(f"must be on or before {rules['max_date']} (max_date)")
        return stamp.isoformat(timespec="microseconds")
    if kind == "boolean":
        if not isinstance(value, bool):
            raise _Bad("must be true or false")
        return value
    if kind == "picklist":
        if not isinstance(value, str):
            raise _Bad("must be a string")
        if value not in {o.value for o in definition.options if o.is_active}:
            raise _Bad(f"{value[:60]!r} is not an active option of this picklist (options)")
        return value
    if kind == "multipicklist":
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise _Bad("must be a list of option values")
        allowed = {o.value for o in definition.options if o.is_active}
        chosen: list[str] = []
        for item in value:
            if not isinstance(item, str) or item not in allowed:
                raise _Bad(f"{str(item)[:60]!r} is not an active option of this picklist (options)")
            if item in chosen:
                raise _Bad(f"{item[:60]!r} is selected twice")
            chosen.append(item)
        if len(chosen) > int(rules["max_selections"]):
            raise _Bad(f"must have at most {rules['max_selections']} selections (max_selections)")
        return chosen
    if kind in REFERENCE_TYPES:
        if isinstance(value, uuid.UUID):
            return str(value)
        if not isinstance(value, str):
            raise _Bad("must be a record id (UUID)")
        try:
            return str(uuid.UUID(value.strip()))
        except ValueError as exc:
            raise _Bad("must be a record id (UUID)") from exc
    raise _Bad(f"has an unknown field type {kind!r}")


def validate_values(
    values: Mapping[str, Any],
    definitions: Iterable[FieldDefinition],
    *,
    partial: bool = False,
    prefix: str = DEFAULT_PREFIX,
) -> ValidationResult:
    """Checks and normalises a dict of values against the field definitions of one object.

    `partial=False` (create): defaults fill missing keys and required fields must have a value.
    `partial=True` (update): only the given keys are checked; None clears a field unless it is
    required. The result holds the cleaned values (None values omitted) or every violation,
    each named ``<prefix>.<field name>``.
    """
    by_name = {d.name: d for d in definitions}
    cleaned: dict[str, Any] = {}
    violations: list[FieldViolation] = []
    for name in sorted(values, key=str):
        value = values[name]
        path = f"{prefix}.{name}"
        definition = by_name.get(name) if isinstance(name, str) else None
        if definition is None:
            violations.append(FieldViolation(path, "is not a field of this object"))
            continue
        if not definition.is_active:
            violations.append(FieldViolation(path, "is an inactive field and takes no values"))
            continue
        if value is None:
            if definition.required:
                violations.append(FieldViolation(path, "is required (required)"))
            continue
        try:
            cleaned[name] = _clean_one(definition, value)
        except _Bad as exc:
            violations.append(FieldViolation(path, str(exc)))
    if not partial:
        for definition in by_name.values():
            if not definition.is_active or definition.name in values:
                continue
            try:
                default = default_for(definition)
            except _Bad as exc:  # a stored default that no longer fits its rules
                violations.append(FieldViolation(f"{prefix}.{definition.name}", f"default value {exc}"))
                continue
            if default is not None:
                cleaned[definition.name] = default
            elif definition.required:
                violations.append(FieldViolation(f"{prefix}.{definition.name}", "is required (required)"))
    return ValidationResult(values=cleaned if not violations else {}, violations=violations)


def clean_values(
    values: Mapping[str, Any],
    definitions: Iterable[FieldDefinition],
    *,
    partial: bool = False,
    prefix: str = DEFAULT_PREFIX,
) -> dict[str, Any]:
    """`validate_values`, raising `InvalidArgument` with every violation."""
    return validate_values(values, definitions, partial=partial, prefix=prefix).raise_for_violations()


def required_violations(
    stored: Mapping[str, Any], definitions: Iterable[FieldDefinition], prefix: str = DEFAULT_PREFIX
) -> list[FieldViolation]:
    """Required active fields that have no value in a merged (stored + update) record."""
    return [
        FieldViolation(f"{prefix}.{d.name}", "is required (required)")
        for d in definitions
        if d.is_active and d.required and stored.get(d.name) is None
    ]


# --- protobuf --------------------------------------------------------------------------------


def from_field_value(value: common_pb2.FieldValue) -> Any:
    """A FieldValue as a python value (None when no kind is set); decimals stay exact."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "decimal_value":
        return value.decimal_value
    if kind == "date_value":
        d = value.date_value
        try:
            return dt.date(d.year, d.month, d.day)
        except ValueError:
            # Kept as text so the validator reports it against the field, not as a crash.
            return f"{d.year:04d}-{d.month:02d}-{d.day:02d}"
    if kind == "timestamp_value":
        return value.timestamp_value.ToDatetime(tzinfo=dt.UTC)
    if kind == "string_list_value":
        return list(value.string_list_value.values)
    return getattr(value, kind)


def values_from_proto(values: Mapping[str, common_pb2.FieldValue]) -> dict[str, Any]:
    """A `map<string, FieldValue>` as a dict of python values for `validate_values`."""
    return {name: from_field_value(value) for name, value in values.items()}


def to_field_value(value: Any, field_type: str | None = None) -> common_pb2.FieldValue:
    """A cleaned (stored) value as a FieldValue; `field_type` picks the kind, and without it
    (a key with no definition any more) the kind follows the python type."""
    out = common_pb2.FieldValue()
    if value is None:
        return out
    if field_type in DECIMAL_TYPES:
        out.decimal_value = str(value)
    elif field_type == "number":
        out.int_value = int(value)
    elif field_type == "date":
        day = _as_date(value)
        out.date_value.CopyFrom(date_pb2.Date(year=day.year, month=day.month, day=day.day))
    elif field_type == "datetime":
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(_as_datetime(value))
        out.timestamp_value.CopyFrom(stamp)
    elif field_type in REFERENCE_TYPES:
        out.reference_value = str(value)
    elif field_type == "multipicklist" or isinstance(value, list):
        out.string_list_value.values.extend(str(v) for v in value)
    elif field_type == "boolean" or isinstance(value, bool):
        out.bool_value = bool(value)
    elif isinstance(value, int):
        out.int_value = value
    elif isinstance(value, decimal.Decimal | float):
        out.decimal_value = str(value)
    else:
        out.string_value = str(value)
    return out


def values_to_proto(
    values: Mapping[str, Any], definitions: Iterable[FieldDefinition]
) -> dict[str, common_pb2.FieldValue]:
    """Stored values as a `map<string, FieldValue>`, typed by their definitions."""
    types = {d.name: d.field_type for d in definitions}
    return {
        name: to_field_value(value, types.get(name)) for name, value in values.items() if value is not None
    }


#: The typed SQL reader (`<schema>.<reader>(jsonb, text)`) of each indexable field type; the
#: services that index custom field values (core-entity, custom-object) each create these
#: readers in their own schema. textarea and url values may exceed a B-tree entry, and
#: multipicklist values are lists: those are filterable, not indexed.
INDEX_READERS: Final[Mapping[str, str]] = {
    "number": "field_bigint",
    "decimal": "field_numeric",
    "currency": "field_numeric",
    "percent": "field_numeric",
    "date": "field_date",
    "datetime": "field_timestamptz",
    "boolean": "field_boolean",
    "text": "field_text",
    "email": "field_text",
    "phone": "field_text",
    "picklist": "field_text",
    "lookup": "field_text",
    "master_detail": "field_text",
}
