"""The data model's rules for core records, as plain functions over column values.

Each validator takes the full record as it would be stored (a dict of column -> Python value,
after parsing) and returns every broken rule as a `FieldViolation` naming the API field, so a
caller learns about all bad fields at once. Rules that need the database (references, email
uniqueness, the tenant's currencies, parent cycles) live in the service layer.
"""

from __future__ import annotations

import datetime as dt
import decimal
import re
from collections.abc import Callable, Mapping
from typing import Any

from shared.errors import FieldViolation

ACCOUNT_TYPES = ("prospect", "customer", "partner", "competitor")
CONTACT_STATUSES = ("active", "inactive", "deceased")
LEAD_STATUSES = ("new", "contacted", "qualified", "unqualified", "converted")
LEAD_RATINGS = ("hot", "warm", "cold")
DEAL_TYPES = ("new_business", "existing_business", "renewal")
ACTIVITY_TYPES = ("call", "email", "meeting", "task", "note", "demo")
ACTIVITY_STATUSES = ("planned", "in_progress", "completed", "cancelled", "deferred")
ACTIVITY_PRIORITIES = ("low", "medium", "high", "urgent")

# The same patterns as the migration's CHECK constraints, so the database agrees with us.
EMAIL_RE = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$")
PHONE_RE = re.compile(r"^\+?[0-9(][0-9 ().-]{3,28}[0-9]( *(x|ext\.?) *[0-9]{1,6})?$", re.IGNORECASE)
URL_RE = re.compile(r"^https?://[^\s/?#]+\.[^\s/?#]+([/?#]\S*)?$", re.IGNORECASE)
CURRENCY_RE = re.compile(r"^[A-Z]{3}$")

# numeric(15,2) and numeric(5,2): digits before the point.
MONEY_INTEGER_DIGITS = 13
PERCENT_INTEGER_DIGITS = 3
# A due date this far in the past still counts as "now" (client clocks and network delay).
DUE_DATE_GRACE = dt.timedelta(minutes=5)

Record = Mapping[str, Any]
Violations = list[FieldViolation]


def one_of(values: tuple[str, ...]) -> str:
    return "must be one of " + ", ".join(values)


class Checker:
    """Collects violations for one record, prefixing field names (e.g. "account.name")."""

    def __init__(self, record: Record, prefix: str) -> None:
        self.record = record
        self.prefix = prefix
        self.violations: Violations = []

    def field(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def add(self, name: str, description: str) -> None:
        self.violations.append(FieldViolation(self.field(name), description))

    def value(self, column: str) -> Any:
        return self.record.get(column)

    def not_blank(self, column: str, api: str | None = None) -> None:
        value = self.value(column)
        if value is None or not str(value).strip():
            self.add(api or column, "is required and must not be blank")

    def max_length(self, column: str, limit: int, api: str | None = None) -> None:
        value = self.value(column)
        if isinstance(value, str) and len(value) > limit:
            self.add(api or column, f"must be at most {limit} characters")

    def choice(self, column: str, allowed: tuple[str, ...], api: str | None = None) -> None:
        value = self.value(column)
        if value is not None and value not in allowed:
            self.add(api or column, one_of(allowed))

    def matches(self, column: str, pattern: re.Pattern[str], rule: str, api: str | None = None) -> None:
        value = self.value(column)
        if value is not None and not pattern.match(str(value)):
            self.add(api or column, rule)

    def phone(self, column: str) -> None:
        value = self.value(column)
        if value is None:
            return
        digits = sum(ch.isdigit() for ch in str(value))
        if not PHONE_RE.match(str(value)) or digits < 5:
            self.add(column, "must be a phone number: digits with optional +, spaces, dots, dashes, ()")

    def email(self, column: str) -> None:
        self.matches(column, EMAIL_RE, "must be an e-mail address like name@example.com")

    def url(self, column: str) -> None:
        self.matches(column, URL_RE, "must be an absolute http or https URL")

    def non_negative(self, column: str) -> None:
        value = self.value(column)
        if value is not None and value < 0:
            self.add(column, "must not be negative")

    def between(self, column: str, low: int, high: int) -> None:
        value = self.value(column)
        if value is not None and not low <= value <= high:
            self.add(column, f"must be between {low} and {high}")

    def decimal_digits(self, column: str, integer_digits: int) -> None:
        value = self.value(column)
        if isinstance(value, decimal.Decimal) and value.is_finite():
            exponent = value.as_tuple().exponent
            if isinstance(exponent, int) and exponent < -2:
                self.add(column, "must have at most 2 decimal places")
            elif abs(value) >= decimal.Decimal(10) ** integer_digits:
                self.add(column, f"must have at most {integer_digits} digits before the decimal point")


def validate_account(record: Record, prefix: str = "account") -> Violations:
    c = Checker(record, prefix)
    c.not_blank("name")
    c.max_length("name", 255)
    c.choice("account_type", ACCOUNT_TYPES)
    c.max_length("industry", 100)
    c.max_length("website", 255)
    c.url("website")
    c.max_length("phone", 50)
    c.phone("phone")
    c.non_negative("annual_revenue")
    c.decimal_digits("annual_revenue", MONEY_INTEGER_DIGITS)
    c.non_negative("employee_count")
    if record.get("id") is not None and record.get("parent_account_id") == record.get("id"):
        c.add("parent_account_id", "must not be the account itself")
    return c.violations


def validate_contact(record: Record, prefix: str = "contact") -> Violations:
    c = Checker(record, prefix)
    for column in ("first_name", "last_name"):
        c.not_blank(column)
        c.max_length(column, 100)
    c.max_length("email", 255)
    c.email("email")
    for column in ("phone", "mobile"):
        c.max_length(column, 50)
        c.phone(column)
    for column in ("title", "department", "lead_source"):
        c.max_length(column, 100)
    c.choice("contact_status", CONTACT_STATUSES)
    return c.violations


def validate_lead(record: Record, prefix: str = "lead") -> Violations:
    c = Checker(record, prefix)
    for column in ("first_name", "last_name"):
        c.not_blank(column)
        c.max_length(column, 100)
    c.max_length("email", 255)
    c.email("email")
    c.max_length("phone", 50)
    c.phone("phone")
    c.max_length("company", 255)
    for column in ("title", "lead_source", "industry"):
        c.max_length(column, 100)
    c.choice("lead_status", LEAD_STATUSES)
    c.between("lead_score", 0, 100)
    c.choice("rating", LEAD_RATINGS)
    c.non_negative("annual_revenue")
    c.decimal_digits("annual_revenue", MONEY_INTEGER_DIGITS)
    c.non_negative("employee_count")
    c.max_length("website", 255)
    c.url("website")
    # Conversion fields move together: all set by ConvertLead, or none.
    converted = bool(record.get("converted"))
    if (record.get("lead_status") == "converted") != converted:
        c.add("lead_status", "is set to converted by ConvertLead only, and a converted lead stays converted")
    if converted and record.get("converted_date") is None:
        c.add("converted_time", "is required on a converted lead")
    if not converted and any(
        record.get(column) is not None
        for column in ("converted_date", "converted_contact_id", "converted_account_id", "converted_deal_id")
    ):
        c.add("converted", "conversion fields are set only by ConvertLead")
    return c.violations


def validate_deal(record: Record, prefix: str = "deal") -> Violations:
    c = Checker(record, prefix)
    c.not_blank("name")
    c.max_length("name", 255)
    c.non_negative("amount")
    c.decimal_digits("amount", MONEY_INTEGER_DIGITS)
    c.between("probability", 0, 100)
    c.decimal_digits("probability", PERCENT_INTEGER_DIGITS)
    c.matches("currency", CURRENCY_RE, "must be a three-letter ISO 4217 code in upper case, e.g. USD")
    c.choice("deal_type", DEAL_TYPES)
    c.max_length("lead_source", 100)
    if record.get("is_won") and not record.get("is_closed"):
        c.add("is_won", "a won deal must be closed (is_closed)")
    if record.get("is_closed") and record.get("actual_close_date") is None:
        c.add("actual_close_date", "is required when the deal is closed")
    return c.violations


def validate_pipeline(record: Record, prefix: str = "pipeline") -> Violations:
    c = Checker(record, prefix)
    c.not_blank("name")
    c.max_length("name", 255)
    return c.violations


def validate_stage(record: Record, prefix: str = "stage") -> Violations:
    c = Checker(record, prefix)
    c.not_blank("name")
    c.max_length("name", 255)
    c.between("probability", 0, 100)
    c.decimal_digits("probability", PERCENT_INTEGER_DIGITS)
    value = record.get("stage_order")
    if value is not None and value < 0:
        c.add("stage_order", "must not be negative")
    if record.get("is_won") and not record.get("is_closed"):
        c.add("is_won", "a won stage must be closed (is_closed)")
    return c.violations


def validate_activity(
    record: Record, prefix: str = "activity", *, creating: bool, now: dt.datetime | None = None
) -> Violations:
    c = Checker(record, prefix)
    c.not_blank("subject")
    c.max_length("subject", 255)
    if record.get("activity_type") is None:
        c.add("activity_type", "is required; " + one_of(ACTIVITY_TYPES))
    c.choice("activity_type", ACTIVITY_TYPES)
    c.choice("status", ACTIVITY_STATUSES)
    c.choice("priority", ACTIVITY_PRIORITIES)
    c.max_length("location", 255)
    if not any(record.get(column) for column in ("account_id", "contact_id", "lead_id", "deal_id")):
        c.add("account_id", "at least one of account_id, contact_id, lead_id and deal_id is required")
    duration = record.get("duration_minutes")
    if duration is not None and duration <= 0:
        c.add("duration_minutes", "must be greater than 0")
    c.non_negative("reminder_minutes")
    due = record.get("due_date")
    now = now or dt.datetime.now(dt.UTC)
    if creating and due is not None and due < now - DUE_DATE_GRACE:
        c.add("due_time", "must not be in the past for a new activity")
    completed = record.get("completed_date") is not None
    if record.get("status") == "completed" and not completed:
        c.add("completed_time", "is required when status is completed")
    if record.get("status") != "completed" and completed:
        c.add("status", "must be completed when completed_time is set")
    return c.violations


VALIDATORS: dict[str, Callable[..., Violations]] = {
    "accounts": validate_account,
    "contacts": validate_contact,
    "leads": validate_lead,
    "deals": validate_deal,
    "pipelines": validate_pipeline,
    "pipeline_stages": validate_stage,
    "activities": validate_activity,
}
