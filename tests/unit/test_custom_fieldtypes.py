"""The shared field-type validator: every type's good and bad values, rules, defaults, partial
updates, patterns that must not hang, and FieldValue round trips (with hypothesis)."""

from __future__ import annotations

import datetime as dt
import decimal
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crm.v1 import common_pb2
from shared.errors import InvalidArgument
from shared.fieldtypes import (
    FIELD_TYPES,
    FieldDefinition,
    PicklistOption,
    clean_values,
    data_type_for,
    from_field_value,
    to_field_value,
    validate_definition,
    validate_values,
    values_from_proto,
    values_to_proto,
)

pytestmark = pytest.mark.unit

STATUS = FieldDefinition(
    "status",
    "picklist",
    required=True,
    options=(
        PicklistOption("planning", "Planning", 1, is_default=True),
        PicklistOption("in_progress", "In Progress", 2),
        PicklistOption("on_hold", "On Hold", 3),
        PicklistOption("completed", "Completed", 4),
        PicklistOption("cancelled", "Cancelled", 5, is_active=False),
    ),
)
PROJECT = [
    FieldDefinition("project_name", "text", required=True, rules={"max_length": 255}),
    FieldDefinition("start_date", "date", required=True),
    FieldDefinition("end_date", "date"),
    FieldDefinition("budget", "currency", rules={"min_value": 0}),
    STATUS,
]


def one_violation(values: dict[str, object], definitions: list[FieldDefinition]) -> tuple[str, str]:
    result = validate_values(values, definitions, partial=True)
    assert len(result.violations) == 1, result.violations
    return result.violations[0].field, result.violations[0].description


def test_project_record_is_cleaned_and_defaulted() -> None:
    cleaned = clean_values(
        {"project_name": "Apollo", "start_date": dt.date(2026, 1, 5), "budget": "1500.5"}, PROJECT
    )
    assert cleaned == {
        "project_name": "Apollo",
        "start_date": "2026-01-05",
        "budget": "1500.50",
        "status": "planning",
    }


def test_every_bad_field_is_named_with_its_rule() -> None:
    with pytest.raises(InvalidArgument) as caught:
        clean_values({"budget": "-1", "status": "unknown", "colour": "red"}, PROJECT)
    fields = {v.field: v.description for v in caught.value.violations}
    assert "min_value" in fields["custom_fields.budget"]
    assert "option" in fields["custom_fields.status"]
    assert fields["custom_fields.colour"] == "is not a field of this object"
    assert "required" in fields["custom_fields.project_name"]
    assert "required" in fields["custom_fields.start_date"]


def test_partial_update_checks_only_given_keys_and_refuses_clearing_required() -> None:
    assert validate_values({"budget": "10"}, PROJECT, partial=True).values == {"budget": "10.00"}
    field, rule = one_violation({"project_name": None}, PROJECT)
    assert field == "custom_fields.project_name" and "required" in rule
    assert validate_values({"end_date": None}, PROJECT, partial=True).ok


def test_inactive_option_and_inactive_field_are_refused() -> None:
    assert "option" in one_violation({"status": "cancelled"}, PROJECT)[1]
    inactive = [FieldDefinition("old", "text", is_active=False, required=True)]
    assert "inactive" in one_violation({"old": "x"}, inactive)[1]
    # An inactive required field does not block creates.
    assert clean_values({}, inactive) == {}


@pytest.mark.parametrize(
    ("field_type", "value", "expected"),
    [
        ("text", "hello", "hello"),
        ("textarea", "x" * 32768, "x" * 32768),
        ("number", 42, 42),
        ("number", "-7", -7),
        ("decimal", "12.3", "12.30"),
        ("decimal", decimal.Decimal("-999999999999.99"), "-999999999999.99"),
        ("currency", 5, "5.00"),
        ("percent", "99.99", "99.99"),
        ("date", "2026-02-28", "2026-02-28"),
        ("datetime", "2026-02-28T10:00:00+02:00", "2026-02-28T08:00:00.000000+00:00"),
        ("datetime", "2026-02-28T10:00:00Z", "2026-02-28T10:00:00.000000+00:00"),
        ("boolean", False, False),
        ("email", "a.b+c@example.co", "a.b+c@example.co"),
        ("phone", "+1 (555) 123-4567", "+1 (555) 123-4567"),
        ("url", "https://example.com/x", "https://example.com/x"),
        ("lookup", "6F9619FF-8B86-D011-B42D-00CF4FC964FF", "6f9619ff-8b86-d011-b42d-00cf4fc964ff"),
    ],
)
def test_good_values_are_normalised(field_type: str, value: object, expected: object) -> None:
    definition = FieldDefinition("f", field_type)
    assert clean_values({"f": value}, [definition]) == {"f": expected}


@pytest.mark.parametrize(
    ("field_type", "value", "rule"),
    [
        ("text", "x" * 256, "max_length"),
        ("text", 5, "string"),
        ("textarea", "x" * 32769, "max_length"),
        ("number", 2_147_483_648, "max_value"),
        ("number", True, "boolean"),
        ("number", "1.5", "integer"),
        ("decimal", "1.005", "decimal places"),
        ("decimal", "1e400", "max_value"),
        ("decimal", "NaN", "finite"),
        ("decimal", "abc", "decimal"),
        ("currency", "1000000000000.00", "max_value"),
        ("percent", "100.01", "max_value"),
        ("percent", "-1", "min_value"),
        ("date", "1899-12-31", "min_date"),
        ("date", "2026-02-30", "YYYY-MM-DD"),
        ("date", "2026-02-01T00:00", "YYYY-MM-DD"),
        ("datetime", "2026-02-01T00:00:00", "offset"),
        ("boolean", "true", "true or false"),
        ("email", "not-an-email", "pattern"),
        ("phone", "12", "pattern"),
        ("url", "ftp://x", "pattern"),
        ("lookup", "'; DROP TABLE x; --", "UUID"),
    ],
)
def test_bad_values_name_the_rule(field_type: str, value: object, rule: str) -> None:
    field, description = one_violation({"f": value}, [FieldDefinition("f", field_type)])
    assert field == "custom_fields.f"
    assert rule in description


def test_multipicklist_rules() -> None:
    colours = FieldDefinition(
        "colours",
        "multipicklist",
        rules={"max_selections": 2},
        options=tuple(PicklistOption(c, c, i) for i, c in enumerate(["red", "green", "blue"])),
    )
    assert clean_values({"colours": ["red", "blue"]}, [colours]) == {"colours": ["red", "blue"]}
    assert "max_selections" in one_violation({"colours": ["red", "green", "blue"]}, [colours])[1]
    assert "twice" in one_violation({"colours": ["red", "red"]}, [colours])[1]
    assert "option" in one_violation({"colours": ["pink"]}, [colours])[1]
    assert "list" in one_violation({"colours": "red"}, [colours])[1]


def test_tenant_pattern_and_length_rules() -> None:
    sku = FieldDefinition("sku", "text", rules={"pattern": "^[A-Z]{3}-[0-9]+$", "min_length": 5})
    assert clean_values({"sku": "ABC-12"}, [sku]) == {"sku": "ABC-12"}
    assert "pattern" in one_violation({"sku": "abc-12"}, [sku])[1]
    assert "min_length" in one_violation({"sku": "A"}, [sku])[1]


def test_catastrophic_pattern_runs_in_linear_time() -> None:
    # (a+)+$ backtracks exponentially in Python's re; RE2 answers at once.
    definition = FieldDefinition("f", "textarea", rules={"pattern": "^(a+)+$"})
    assert validate_definition(definition) == []
    started = time.perf_counter()
    result = validate_values({"f": "a" * 30000 + "!"}, [definition])
    assert time.perf_counter() - started < 1.0
    assert "pattern" in result.violations[0].description


@pytest.mark.parametrize(
    ("definition", "path"),
    [
        (FieldDefinition("f", "text", rules={"pattern": r"(a)\1"}), "field.validation_rules.pattern"),
        (FieldDefinition("f", "text", rules={"pattern": "x" * 1001}), "field.validation_rules.pattern"),
        (FieldDefinition("f", "text", rules={"max_length": 256}), "field.validation_rules.max_length"),
        (FieldDefinition("f", "text", rules={"min_value": 1}), "field.validation_rules.min_value"),
        (
            FieldDefinition("f", "number", rules={"min_value": 5, "max_value": 1}),
            "field.validation_rules.min_value",
        ),
        (FieldDefinition("f", "percent", rules={"max_value": "1000"}), "field.validation_rules.max_value"),
        (
            FieldDefinition("f", "date", rules={"min_date": "2030-01-01", "max_date": "2020-01-01"}),
            "field.validation_rules.min_date",
        ),
        (
            FieldDefinition(
                "f", "multipicklist", rules={"max_selections": 0}, options=(PicklistOption("a"),)
            ),
            "field.validation_rules.max_selections",
        ),
        (FieldDefinition("f", "picklist"), "field.options"),
        (
            FieldDefinition("f", "picklist", options=(PicklistOption("a"), PicklistOption("a", order=1))),
            "field.options[1].value",
        ),
        (
            FieldDefinition("f", "picklist", options=(PicklistOption("a"), PicklistOption("b"))),
            "field.options[1].order",
        ),
        (FieldDefinition("f", "text", options=(PicklistOption("a"),)), "field.options"),
        (FieldDefinition("f", "number", default="abc"), "field.default_value"),
        (
            FieldDefinition("f", "lookup", default="6f9619ff-8b86-d011-b42d-00cf4fc964ff"),
            "field.default_value",
        ),
        (FieldDefinition("f", "blob"), "field.field_type"),
    ],
)
def test_bad_definitions_name_the_part(definition: FieldDefinition, path: str) -> None:
    assert path in {v.field for v in validate_definition(definition)}


def test_every_seed_type_has_its_data_type() -> None:
    assert len(FIELD_TYPES) == 16
    assert data_type_for("currency") == "decimal"
    assert data_type_for("multipicklist") == "jsonb"
    assert data_type_for("datetime") == "timestamp"
    for name in FIELD_TYPES:
        options = (PicklistOption("a"),) if FIELD_TYPES[name].requires_options else ()
        assert validate_definition(FieldDefinition("f", name, options=options)) == []


# --- property tests ---------------------------------------------------------------------------

DECIMAL = FieldDefinition("amount", "decimal")
NUMBER = FieldDefinition("count", "number")
DATE = FieldDefinition("day", "date")
TEXT = FieldDefinition("name", "text", rules={"max_length": 40})


@given(st.decimals(min_value=-999999999999, max_value=999999999999, places=2, allow_nan=False))
def test_good_decimals_round_trip(amount: decimal.Decimal) -> None:
    cleaned = clean_values({"amount": amount}, [DECIMAL])["amount"]
    assert decimal.Decimal(cleaned) == amount
    proto = to_field_value(cleaned, "decimal")
    assert clean_values({"amount": from_field_value(proto)}, [DECIMAL])["amount"] == cleaned


@given(st.decimals(allow_nan=True, allow_infinity=True))
def test_any_decimal_is_either_clean_or_a_named_violation(amount: decimal.Decimal) -> None:
    result = validate_values({"amount": amount}, [DECIMAL])
    if result.ok:
        assert -decimal.Decimal("999999999999.99") <= decimal.Decimal(result.values["amount"])
    else:
        assert [v.field for v in result.violations] == ["custom_fields.amount"]


@given(st.integers())
def test_integers_inside_int32_pass_and_others_are_refused(value: int) -> None:
    result = validate_values({"count": value}, [NUMBER])
    assert result.ok == (-(2**31) <= value < 2**31)


@given(st.dates())
def test_dates_inside_the_seed_range_round_trip(day: dt.date) -> None:
    result = validate_values({"day": day}, [DATE])
    assert result.ok == (dt.date(1900, 1, 1) <= day <= dt.date(2100, 12, 31))
    if result.ok:
        proto = to_field_value(result.values["day"], "date")
        assert from_field_value(proto) == day


@given(st.text(max_size=80))
def test_text_is_kept_verbatim_or_refused_for_length(text: str) -> None:
    result = validate_values({"name": text}, [TEXT])
    assert result.ok == (len(text) <= 40)
    if result.ok:
        assert result.values == {"name": text}


@given(st.dictionaries(st.text(min_size=1, max_size=20), st.integers(), max_size=5))
def test_unknown_keys_are_always_refused(values: dict[str, int]) -> None:
    values.pop("count", None)
    result = validate_values(values, [NUMBER], partial=True)
    assert {v.field for v in result.violations} == {f"custom_fields.{k}" for k in values}


@given(
    st.datetimes(
        timezones=st.just(dt.UTC), min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2100, 12, 31)
    )
)
def test_datetimes_round_trip_through_field_value(stamp: dt.datetime) -> None:
    definition = FieldDefinition("at", "datetime")
    cleaned = clean_values({"at": stamp}, [definition])["at"]
    back = from_field_value(to_field_value(cleaned, "datetime"))
    assert back == stamp


def test_field_value_map_conversion_is_typed() -> None:
    proto = {
        "budget": common_pb2.FieldValue(decimal_value="10.5"),
        "start_date": to_field_value("2026-03-01", "date"),
        "project_name": common_pb2.FieldValue(string_value="X"),
        "status": common_pb2.FieldValue(),
    }
    python = values_from_proto(proto)
    assert python["status"] is None
    cleaned = clean_values({k: v for k, v in python.items() if v is not None}, PROJECT)
    back = values_to_proto(cleaned, PROJECT)
    assert back["budget"].decimal_value == "10.50"
    assert back["start_date"].date_value.day == 1
    assert back["status"].string_value == "planning"
