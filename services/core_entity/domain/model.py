"""What each core resource is made of: its fields, how they map to columns, which are
writable, indexed (so filterable and sortable) or defaulted. Plain data: the gRPC codec, the
repository, import/export and the filters all read these specs instead of repeating them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Kind(enum.StrEnum):
    TEXT = "text"
    DECIMAL = "decimal"
    INT = "int"
    BOOL = "bool"
    UUID = "uuid"
    ADDRESS = "address"
    TIMESTAMP = "timestamp"
    DATE = "date"
    CUSTOM = "custom"


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of a resource: its API (proto) name, its column and its kind."""

    api: str
    kind: Kind = Kind.TEXT
    column: str = ""
    writable: bool = True
    #: proto3 `optional`: an absent value means NULL (or the column default on create).
    presence: bool = False
    #: Filterable and sortable: the column has an index (see the migration).
    indexed: bool = False

    @property
    def col(self) -> str:
        return self.column or self.api


# Output-only fields every resource carries; stages have no delete_time.
COMMON_FIELDS = (
    FieldSpec("id", Kind.UUID, writable=False, indexed=True),
    FieldSpec("create_time", Kind.TIMESTAMP, "created_at", writable=False, indexed=True),
    FieldSpec("update_time", Kind.TIMESTAMP, "updated_at", writable=False, indexed=True),
    FieldSpec("created_by", Kind.UUID, writable=False),
    FieldSpec("updated_by", Kind.UUID, writable=False),
)
DELETE_TIME = FieldSpec("delete_time", Kind.TIMESTAMP, "deleted_at", writable=False)


@dataclass(frozen=True, slots=True)
class EntitySpec:
    """A core resource: `name` is its singular API name (field paths are "<name>.<field>")."""

    name: str
    table: str
    own_fields: tuple[FieldSpec, ...]
    #: Column defaults applied on create when the client gave no value.
    defaults: dict[str, Any] = field(default_factory=dict)
    soft_delete: bool = True
    has_custom_fields: bool = True

    @property
    def fields(self) -> tuple[FieldSpec, ...]:
        extra = (DELETE_TIME,) if self.soft_delete else ()
        return (*self.own_fields, *COMMON_FIELDS, *extra)

    @property
    def writable(self) -> tuple[FieldSpec, ...]:
        return tuple(f for f in self.own_fields if f.writable)

    def by_api(self, api: str) -> FieldSpec | None:
        return next((f for f in self.fields if f.api == api), None)

    @property
    def indexed(self) -> tuple[FieldSpec, ...]:
        return tuple(f for f in self.fields if f.indexed)


T, D, N, B, U = Kind.TEXT, Kind.DECIMAL, Kind.INT, Kind.BOOL, Kind.UUID

ACCOUNT = EntitySpec(
    "account",
    "accounts",
    (
        FieldSpec("name", T, indexed=True),
        FieldSpec("account_type", T, indexed=True),
        FieldSpec("industry"),
        FieldSpec("website"),
        FieldSpec("phone"),
        FieldSpec("billing_address", Kind.ADDRESS),
        FieldSpec("shipping_address", Kind.ADDRESS),
        FieldSpec("parent_account_id", U, indexed=True),
        FieldSpec("annual_revenue", D),
        FieldSpec("employee_count", N, presence=True),
        FieldSpec("description"),
        FieldSpec("custom_fields", Kind.CUSTOM),
    ),
    defaults={"account_type": "prospect"},
)

CONTACT = EntitySpec(
    "contact",
    "contacts",
    (
        FieldSpec("account_id", U, indexed=True),
        FieldSpec("first_name", T, indexed=True),
        FieldSpec("last_name", T, indexed=True),
        FieldSpec("email", T, indexed=True),
        FieldSpec("phone"),
        FieldSpec("mobile"),
        FieldSpec("title"),
        FieldSpec("department"),
        FieldSpec("mailing_address", Kind.ADDRESS),
        FieldSpec("lead_source"),
        FieldSpec("contact_status", T, indexed=True),
        FieldSpec("do_not_call", B),
        FieldSpec("do_not_email", B),
        FieldSpec("email_opt_out", B),
        FieldSpec("description"),
        FieldSpec("custom_fields", Kind.CUSTOM),
    ),
    defaults={"contact_status": "active"},
)

LEAD = EntitySpec(
    "lead",
    "leads",
    (
        FieldSpec("first_name"),
        FieldSpec("last_name"),
        FieldSpec("email", T, indexed=True),
        FieldSpec("phone"),
        FieldSpec("company"),
        FieldSpec("title"),
        FieldSpec("lead_source"),
        FieldSpec("lead_status", T, indexed=True),
        FieldSpec("lead_score", N, presence=True, indexed=True),
        FieldSpec("rating"),
        FieldSpec("industry"),
        FieldSpec("annual_revenue", D),
        FieldSpec("employee_count", N, presence=True),
        FieldSpec("website"),
        FieldSpec("mailing_address", Kind.ADDRESS),
        FieldSpec("description"),
        FieldSpec("converted", B, writable=False, indexed=True),
        FieldSpec("converted_time", Kind.TIMESTAMP, "converted_date", writable=False),
        FieldSpec("converted_contact_id", U, writable=False),
        FieldSpec("converted_account_id", U, writable=False),
        FieldSpec("converted_deal_id", U, writable=False),
        FieldSpec("custom_fields", Kind.CUSTOM),
    ),
    defaults={"lead_status": "new", "lead_score": 0, "converted": False},
)

DEAL = EntitySpec(
    "deal",
    "deals",
    (
        FieldSpec("account_id", U, indexed=True),
        FieldSpec("contact_id", U, indexed=True),
        FieldSpec("pipeline_id", U, indexed=True),
        FieldSpec("stage_id", U, indexed=True),
        FieldSpec("name"),
        FieldSpec("amount", D, indexed=True),
        FieldSpec("currency"),
        FieldSpec("probability", D),
        FieldSpec("expected_close_date", Kind.DATE, indexed=True),
        FieldSpec("actual_close_date", Kind.DATE),
        FieldSpec("deal_type"),
        FieldSpec("lead_source"),
        FieldSpec("next_step"),
        FieldSpec("description"),
        FieldSpec("is_closed", B, presence=True, indexed=True),
        FieldSpec("is_won", B, presence=True, indexed=True),
        FieldSpec("custom_fields", Kind.CUSTOM),
    ),
    # currency defaults in the service: USD, or the tenant's first currency without USD.
)

PIPELINE = EntitySpec(
    "pipeline",
    "pipelines",
    (
        FieldSpec("name", T, indexed=True),
        FieldSpec("description"),
        FieldSpec("is_default", B, indexed=True),
        FieldSpec("is_active", B, presence=True, indexed=True),
    ),
    defaults={"is_active": True, "is_default": False},
    has_custom_fields=False,
)

STAGE = EntitySpec(
    "stage",
    "pipeline_stages",
    (
        FieldSpec("pipeline_id", U, writable=False),
        FieldSpec("name"),
        FieldSpec("stage_order", N, presence=True),
        FieldSpec("probability", D),
        FieldSpec("is_closed", B),
        FieldSpec("is_won", B),
    ),
    soft_delete=False,
    has_custom_fields=False,
)

ACTIVITY = EntitySpec(
    "activity",
    "activities",
    (
        FieldSpec("account_id", U, indexed=True),
        FieldSpec("contact_id", U, indexed=True),
        FieldSpec("lead_id", U, indexed=True),
        FieldSpec("deal_id", U, indexed=True),
        FieldSpec("activity_type", T, indexed=True),
        FieldSpec("subject"),
        FieldSpec("description"),
        FieldSpec("status", T, indexed=True),
        FieldSpec("priority"),
        FieldSpec("due_time", Kind.TIMESTAMP, "due_date", indexed=True),
        FieldSpec("completed_time", Kind.TIMESTAMP, "completed_date"),
        FieldSpec("duration_minutes", N, presence=True),
        FieldSpec("location"),
        FieldSpec("is_all_day", B),
        FieldSpec("reminder_minutes", N, presence=True),
        FieldSpec("assigned_to", U, indexed=True),
        FieldSpec("custom_fields", Kind.CUSTOM),
    ),
    defaults={"status": "planned", "priority": "medium"},
)

ENTITIES: dict[str, EntitySpec] = {
    spec.name: spec for spec in (ACCOUNT, CONTACT, LEAD, DEAL, PIPELINE, STAGE, ACTIVITY)
}
BY_TABLE: dict[str, EntitySpec] = {spec.table: spec for spec in ENTITIES.values()}
