"""The core-entity rules and codecs without a database: every rule's good and bad cases, the
proto <-> column codec and the text rows of import/export."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crm.v1 import core_entity_pb2 as pb
from services.core_entity.domain import model, rules
from services.core_entity.entrypoints import codec
from services.core_entity.service_layer.imports import parse_text_row, text_row

pytestmark = pytest.mark.unit


def fields_of(violations: list[rules.FieldViolation]) -> set[str]:
    return {v.field for v in violations}


def test_a_good_account_passes() -> None:
    assert (
        rules.validate_account(
            {
                "name": "Acme",
                "account_type": "customer",
                "website": "https://acme.example/about",
                "annual_revenue": decimal.Decimal("10.50"),
                "employee_count": 0,
                "phone": "+1 555 123 4567",
            }
        )
        == []
    )


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"name": " "}, "account.name"),
        ({"name": "A", "website": "http://nodot"}, "account.website"),
        ({"name": "A", "website": "javascript:alert(1)"}, "account.website"),
        ({"name": "A", "annual_revenue": decimal.Decimal("-0.01")}, "account.annual_revenue"),
        ({"name": "A", "annual_revenue": decimal.Decimal("1e14")}, "account.annual_revenue"),
        ({"name": "A", "employee_count": -1}, "account.employee_count"),
        ({"name": "A", "account_type": "Customer"}, "account.account_type"),
    ],
)
def test_account_rules(record: dict[str, object], field: str) -> None:
    assert field in fields_of(rules.validate_account(record))


def test_account_cannot_be_its_own_parent() -> None:
    same = uuid.uuid4()
    assert "account.parent_account_id" in fields_of(
        rules.validate_account({"id": same, "name": "A", "parent_account_id": same})
    )


@pytest.mark.parametrize("email", ["plain", "a@b", "a b@c.de", "@c.de", "a@c.d"])
def test_bad_emails(email: str) -> None:
    assert "contact.email" in fields_of(
        rules.validate_contact({"first_name": "A", "last_name": "B", "email": email})
    )


@pytest.mark.parametrize(
    "phone", ["+1 (555) 123-4567", "030 1234567", "555.123.4567 x12", "+44 20 7946 0958 ext. 3"]
)
def test_good_phones(phone: str) -> None:
    assert rules.validate_contact({"first_name": "A", "last_name": "B", "phone": phone}) == []


@pytest.mark.parametrize("phone", ["12", "call me", "++1 555", "1234-", "(((((("])
def test_bad_phones(phone: str) -> None:
    assert "contact.phone" in fields_of(
        rules.validate_contact({"first_name": "A", "last_name": "B", "phone": phone})
    )


def test_lead_conversion_consistency() -> None:
    base = {"first_name": "A", "last_name": "B", "lead_status": "new", "lead_score": 0}
    assert rules.validate_lead(base) == []
    assert "lead.lead_status" in fields_of(rules.validate_lead({**base, "lead_status": "converted"}))
    assert "lead.converted_time" in fields_of(
        rules.validate_lead({**base, "lead_status": "converted", "converted": True})
    )
    assert "lead.converted" in fields_of(rules.validate_lead({**base, "converted_contact_id": uuid.uuid4()}))
    assert "lead.lead_score" in fields_of(rules.validate_lead({**base, "lead_score": 101}))


def test_deal_rules() -> None:
    base = {"name": "D", "currency": "USD"}
    assert rules.validate_deal(base) == []
    assert "deal.is_won" in fields_of(rules.validate_deal({**base, "is_won": True, "is_closed": False}))
    assert "deal.actual_close_date" in fields_of(rules.validate_deal({**base, "is_closed": True}))
    assert "deal.probability" in fields_of(
        rules.validate_deal({**base, "probability": decimal.Decimal("100.01")})
    )
    assert "deal.currency" in fields_of(rules.validate_deal({**base, "currency": "US"}))
    assert "deal.deal_type" in fields_of(rules.validate_deal({**base, "deal_type": "upsell"}))


def test_activity_rules() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    base = {
        "subject": "S",
        "activity_type": "call",
        "status": "planned",
        "priority": "medium",
        "lead_id": uuid.uuid4(),
    }
    assert rules.validate_activity(base, creating=True, now=now) == []
    past = {**base, "due_date": now - dt.timedelta(hours=1)}
    assert "activity.due_time" in fields_of(rules.validate_activity(past, creating=True, now=now))
    assert rules.validate_activity(past, creating=False, now=now) == []
    assert "activity.account_id" in fields_of(
        rules.validate_activity({**base, "lead_id": None}, creating=True, now=now)
    )
    assert "activity.completed_time" in fields_of(
        rules.validate_activity({**base, "status": "completed"}, creating=True, now=now)
    )
    assert "activity.duration_minutes" in fields_of(
        rules.validate_activity({**base, "duration_minutes": 0}, creating=True, now=now)
    )


def test_codec_round_trip_and_parse_errors() -> None:
    message = pb.Deal(
        name=" Deal ", amount="12.30", account_id=str(uuid.uuid4()), is_closed=True, description=" keep "
    )
    values, violations = codec.parse(model.DEAL, message, "deal")
    assert violations == []
    assert values["name"] == "Deal" and values["description"] == " keep "
    assert values["amount"] == decimal.Decimal("12.30") and values["is_closed"] is True
    assert values["is_won"] is None  # optional and absent
    _, violations = codec.parse(model.DEAL, pb.Deal(amount="1,5", account_id="x", probability="NaN"), "deal")
    assert fields_of(violations) == {"deal.amount", "deal.account_id", "deal.probability"}
    _, violations = codec.parse(model.DEAL, pb.Deal(), "deal", ["name", "etag", "nope"])
    assert [v.field for v in violations] == ["update_mask", "update_mask"]


@pytest.mark.parametrize(
    ("etag", "version"), [("", None), ('W/"3"', 3), ('"4"', 4), ("5", 5), ("garbage", -1)]
)
def test_etags(etag: str, version: int | None) -> None:
    assert codec.parse_etag(etag) == version


def test_text_rows_round_trip() -> None:
    row = {
        "id": uuid.uuid4(),
        "name": "Acme",
        "account_type": "customer",
        "annual_revenue": decimal.Decimal("1.50"),
        "employee_count": 3,
        "billing_address": {"city": "Oslo"},
        "custom_fields": {"tags": ["a", "b"], "vip": True},
        "created_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        "version": 2,
    }
    text = text_row(model.ACCOUNT, row)
    assert text["annual_revenue"] == "1.50" and text["billing_address.city"] == "Oslo"
    assert text["custom_fields.tags"] == "a;b" and text["custom_fields.vip"] == "true"
    parsed, violations = parse_text_row(model.ACCOUNT, text, {"tags": "multipicklist", "vip": "boolean"})
    assert violations == []
    assert parsed["annual_revenue"] == decimal.Decimal("1.50") and parsed["employee_count"] == 3
    assert parsed["custom_fields"] == {"tags": ["a", "b"], "vip": True}
    _, violations = parse_text_row(model.ACCOUNT, {"employee_count": "many", "color": "red"}, {})
    assert fields_of(violations) == {"employee_count", "color"}


@given(st.text(max_size=40))
def test_decimal_parsing_never_crashes(value: str) -> None:
    violations: list[rules.FieldViolation] = []
    parsed = codec.parse_decimal(value, "amount", violations)
    assert (parsed is None) or parsed.is_finite()
    assert len(violations) <= 1


@given(st.text(max_size=60))
def test_any_website_is_accepted_or_named(value: str) -> None:
    found = rules.validate_account({"name": "A", "website": value or None})
    assert all(v.field in ("account.website",) for v in found)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "amount": st.text(max_size=20),
            "probability": st.text(max_size=20),
            "account_id": st.text(max_size=40),
            "name": st.text(max_size=300),
            "currency": st.text(max_size=5),
        },
    )
)
def test_any_deal_message_parses_or_names_its_bad_fields(fields: dict[str, str]) -> None:
    """Whatever a client sends, parsing and the rules answer with field violations, never a
    crash, and every violation names a field of the request."""
    values, violations = codec.parse(model.DEAL, pb.Deal(**fields), "deal")
    violations += rules.validate_deal({**values, "currency": values.get("currency") or "USD"})
    assert all(v.field.startswith("deal.") for v in violations)


def test_cli_assignments_build_typed_messages() -> None:
    from cli.commands.core import build

    message, paths = build(
        pb.Account,
        [
            "name=Acme",
            "employee_count=12",
            "billing_address.city=Oslo",
            "custom_fields.budget=12.50",
            "custom_fields.vip=true",
        ],
    )
    assert message.name == "Acme" and message.employee_count == 12
    assert message.billing_address.city == "Oslo"
    assert message.custom_fields["budget"].decimal_value == "12.50"
    assert message.custom_fields["vip"].bool_value
    assert paths == ["billing_address", "custom_fields.budget", "custom_fields.vip", "employee_count", "name"]
    deal, _ = build(pb.Deal, ["is_closed=true", "expected_close_date=2026-05-01"])
    assert deal.is_closed and deal.expected_close_date.month == 5
