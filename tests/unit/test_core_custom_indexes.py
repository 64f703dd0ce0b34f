"""Custom field indexes of core entities without a database: only validated names and ids reach
the index statements and the list expressions, which indexes a tenant's definitions ask for, and
how the keeper schedules builds (in the background, once per definition set, never failing the
call that loaded the definitions)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.sql.elements import ClauseElement

from services.core_entity.adapters import tables
from services.core_entity.adapters.indexes import (
    FIELD_NAME,
    READER_FUNCTIONS,
    IndexBuilder,
    IndexBuildFailed,
    IndexedFieldDefinition,
    IndexKeeper,
    IndexSpec,
    checked_field_name,
    create_index_sql,
    is_field_name,
    specs_for,
    typed_value,
)
from services.core_entity.domain.model import CONTACT
from services.core_entity.service_layer.custom_fields import CustomFields
from services.core_entity.service_layer.listing import field_set
from shared.errors import InvalidArgument
from shared.fieldtypes import FieldDefinition

pytestmark = pytest.mark.unit

TENANT = str(uuid.uuid4())

BAD_NAMES = [
    "x'; DROP TABLE core.contacts; --",
    "region'",
    "a b",
    "region\n",
    "back\\slash",
    "Region",
    "_region",
    "region_",
    "r",
    "",
    "région",
    "x" * 64,
]


def indexed(name: str, field_type: str = "text", **extra: object) -> IndexedFieldDefinition:
    values: dict[str, object] = {"field_id": str(uuid.uuid4()), "is_indexed": True}
    values.update(extra)
    return IndexedFieldDefinition(name, field_type, **values)  # type: ignore[arg-type]


DIALECT = PGDialect_asyncpg()  # type: ignore[no-untyped-call]


def sql(element: ClauseElement) -> str:
    return str(element.compile(dialect=DIALECT))


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_bad_field_name_never_reaches_sql(name: str) -> None:
    with pytest.raises(ValueError):
        checked_field_name(name)
    with pytest.raises(ValueError):
        typed_value(tables.contacts, name, "number")
    spec = IndexSpec(uuid.uuid4(), uuid.UUID(TENANT), "contacts", name, "text")
    with pytest.raises(ValueError):
        create_index_sql(spec, "contacts")
    # Definitions with such a name ask for no index, and lists do not know the field.
    assert specs_for(TENANT, "contact", [indexed(name)]) == []
    fields = field_set(CONTACT, {name: "text"})
    with pytest.raises(InvalidArgument):
        fields.filter(f'custom_fields.{name} = "x"')


@given(st.one_of(st.text(max_size=80), st.from_regex(FIELD_NAME, fullmatch=True)))
def test_only_api_names_pass(name: str) -> None:
    if is_field_name(name):
        assert checked_field_name(name) == name
        assert not set(name) & set("'\"\\ \t\n\r;-()")
        assert f"custom_fields, '{name}')" in sql(typed_value(tables.contacts, name, "text"))
    else:
        with pytest.raises(ValueError):
            checked_field_name(name)


def test_the_index_statement_is_made_of_checked_parts() -> None:
    field_id, tenant = uuid.uuid4(), uuid.UUID(TENANT)
    statement = create_index_sql(IndexSpec(field_id, tenant, "contacts", "budget", "currency"), "contacts")
    assert statement == (
        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_cf_{field_id.hex} ON core.contacts "
        f"(tenant_id, (core.field_numeric(custom_fields, 'budget'))) WHERE tenant_id = '{tenant}'::uuid"
    )
    with pytest.raises(ValueError):
        create_index_sql(IndexSpec(field_id, tenant, "contacts", "budget", "currency"), "contacts; --")
    with pytest.raises(ValueError):
        create_index_sql(IndexSpec(field_id, tenant, "pipelines", "budget", "currency"), "pipelines")
    with pytest.raises(ValueError):
        create_index_sql(IndexSpec(field_id, tenant, "contacts", "notes", "textarea"), "contacts")


def test_lists_compare_with_the_index_expressions() -> None:
    fields = field_set(
        CONTACT,
        {"budget": "currency", "seats": "number", "since": "date", "vip": "boolean", "tags": "multipicklist"},
    )
    rendered = sql(
        fields.filter(
            'custom_fields.budget > 10 AND custom_fields.seats = 3 AND custom_fields.since < "2026-01-01" '
            'AND custom_fields.vip = true AND custom_fields.tags:"gold"'
        )
    )
    assert "core.field_numeric(core.contacts.custom_fields, 'budget') >" in rendered
    assert "core.field_bigint(core.contacts.custom_fields, 'seats') =" in rendered
    assert "core.field_date(core.contacts.custom_fields, 'since') <" in rendered
    assert "core.field_boolean(core.contacts.custom_fields, 'vip') =" in rendered
    assert "core.contacts.custom_fields['tags'] @>" in rendered  # a JSON array containment test
    order = fields.order_by("custom_fields.budget desc")
    assert "core.field_numeric(core.contacts.custom_fields, 'budget') DESC" in sql(
        fields.order_clauses(order)[0]
    )
    assert READER_FUNCTIONS == (
        "field_bigint",
        "field_boolean",
        "field_date",
        "field_numeric",
        "field_text",
        "field_timestamptz",
    )


def test_which_definitions_ask_for_an_index() -> None:
    wanted = indexed("region")
    unique_only = indexed("code", is_indexed=False, unique=True)
    skipped = [
        indexed("inactive", is_active=False),
        indexed("plain", is_indexed=False),
        indexed("notes", "textarea"),
        indexed("tags", "multipicklist"),
        indexed("no_id", field_id="not-a-uuid"),
        FieldDefinition("untracked", "text", unique=True),  # no id: nothing to name an index after
    ]
    specs = specs_for(TENANT, "contact", [wanted, unique_only, *skipped])
    assert [(s.field_name, s.table, s.name) for s in specs] == [
        ("region", "contacts", f"ix_cf_{uuid.UUID(wanted.field_id).hex}"),
        ("code", "contacts", f"ix_cf_{uuid.UUID(unique_only.field_id).hex}"),
    ]
    assert specs_for(TENANT, "activity", [wanted])[0].table == "activities"
    assert specs_for(TENANT, "pipeline", [wanted]) == []
    assert specs_for(TENANT, "project__c", [wanted]) == []
    assert specs_for("not-a-tenant", "contact", [wanted]) == []


class FakeBuilder(IndexBuilder):
    """Answers from memory: which indexes exist, and whether a build fails."""

    def __init__(self, present: set[str] | None = None, fail: bool = False, busy: bool = False) -> None:
        super().__init__("postgresql://owner@127.0.0.1/none")
        self.present = present or set()
        self.fail = fail
        self.busy = busy
        self.checks = 0
        self.built: list[str] = []

    async def missing(self, specs: Sequence[IndexSpec]) -> list[IndexSpec]:
        self.checks += 1
        return [s for s in specs if s.name not in self.present]

    async def build(self, spec: IndexSpec) -> bool:
        await asyncio.sleep(0)
        if self.fail:
            raise IndexBuildFailed(f"{spec.name}: canceling statement due to statement timeout")
        if self.busy:
            return False
        self.built.append(spec.name)
        self.present.add(spec.name)
        return True


async def test_missing_indexes_are_built_once_per_definition_set() -> None:
    builder = FakeBuilder()
    keeper = IndexKeeper(builder)
    region = indexed("region")
    keeper.ensure(TENANT, "contact", [region])
    keeper.ensure(TENANT, "contact", [region])  # while the first check runs: nothing more
    await keeper.wait()
    assert builder.built == [f"ix_cf_{uuid.UUID(region.field_id).hex}"] and builder.checks == 1
    keeper.ensure(TENANT, "contact", [region])  # verified: no catalog check at all
    await keeper.wait()
    assert builder.checks == 1
    budget = indexed("budget", "currency")
    keeper.ensure(TENANT, "contact", [region, budget])  # a new indexed field: a new set
    await keeper.wait()
    assert builder.checks == 2 and len(builder.built) == 2
    keeper.forget(TENANT)  # a definition change: the next load checks again
    keeper.ensure(TENANT, "contact", [region, budget])
    await keeper.wait()
    assert builder.checks == 3 and len(builder.built) == 2


async def test_a_failed_or_busy_build_is_retried_on_a_later_load() -> None:
    for builder in (FakeBuilder(fail=True), FakeBuilder(busy=True)):
        keeper = IndexKeeper(builder)
        region = indexed("region")
        keeper.ensure(TENANT, "contact", [region])
        await keeper.wait()
        keeper.ensure(TENANT, "contact", [region])
        await keeper.wait()
        assert builder.checks == 2 and builder.built == []


async def test_an_unreachable_owner_never_fails_the_call() -> None:
    keeper = IndexKeeper(IndexBuilder("postgresql://owner:pw@127.0.0.1:1/none"))
    keeper.ensure(TENANT, "contact", [indexed("region")])
    await keeper.wait()  # logged, not raised


async def test_custom_fields_show_each_load_to_the_keeper() -> None:
    region = indexed("region")

    class Source:
        async def definitions(self, tenant_id: str, entity_type: str) -> list[FieldDefinition]:
            return [region]

    builder = FakeBuilder()
    custom_fields = CustomFields(Source(), indexes=IndexKeeper(builder))
    assert await custom_fields.types(TENANT, "contact") == {"region": "text"}  # returns at once
    await custom_fields.definitions(TENANT, "contact")  # cached: not shown again
    await asyncio.sleep(0.01)
    assert builder.checks == 1 and builder.built == [f"ix_cf_{uuid.UUID(region.field_id).hex}"]
    custom_fields.forget(TENANT)
    await custom_fields.definitions(TENANT, "contact")
    await asyncio.sleep(0.01)
    assert builder.checks == 2 and len(builder.built) == 1
