"""Plain rules of the custom-object service: names, relationships and where a reference lives,
the index DDL built from validated parts only, etags, metadata and the usage counter."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.custom_object.adapters.indexes import (
    IndexSpec,
    checked_field_name,
    create_index_sql,
    drop_index_sql,
)
from services.custom_object.adapters.usage import UsageTracker
from services.custom_object.domain import rules
from shared.fieldtypes import FieldDefinition

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", ["project__c", "ab", "a1", "budget_2026"])
def test_good_api_names(name: str) -> None:
    assert rules.api_name_violations("x", name) == []


@pytest.mark.parametrize(
    "name", ["", "a", "A", "1a", "a_", "_a", "a-b", "a b", "a'b", "a;drop", "ümlaut", "x" * 101, "a\nb"]
)
def test_bad_api_names(name: str) -> None:
    (violation,) = rules.api_name_violations("custom_object.api_name", name)
    assert violation.field == "custom_object.api_name"


@given(st.text(max_size=80))
def test_a_name_that_passes_can_never_break_out_of_a_sql_literal(name: str) -> None:
    if not rules.api_name_violations("x", name, 63):
        assert checked_field_name(name) == name
        assert not set(name) & set("'\"\\;- \n\t()")
    else:
        with pytest.raises(ValueError):
            checked_field_name(name)


def test_reserved_and_core_names_are_refused() -> None:
    assert rules.field_name_violations("field.field_name", "id")
    assert rules.field_name_violations("field.field_name", "create_time")
    violations = rules.object_violations(
        {"api_name": "account", "name": "A", "label": "A", "plural_label": "As"}, creating=True
    )
    assert [v.field for v in violations] == ["custom_object.api_name"]


def test_object_attributes_are_checked() -> None:
    violations = rules.object_violations(
        {"api_name": "ok_name", "name": "", "label": "x" * 256, "plural_label": "P", "color": "#12345G"},
        creating=True,
    )
    assert {v.field for v in violations} == {
        "custom_object.name",
        "custom_object.label",
        "custom_object.color",
    }


@pytest.mark.parametrize(
    ("kind", "cardinality", "ok"),
    [
        ("lookup", "many_to_one", True),
        ("lookup", "one_to_one", True),
        ("master_detail", "one_to_many", True),
        ("many_to_many", "many_to_many", True),
        ("lookup", "many_to_many", False),
        ("many_to_many", "many_to_one", False),
        ("graph", "many_to_one", False),
        ("lookup", "several", False),
    ],
)
def test_relationship_type_and_cardinality_go_together(kind: str, cardinality: str, ok: bool) -> None:
    values = {
        "relationship_name": "rel",
        "from_object_type": "project__c",
        "to_object_type": "account",
        "relationship_type": kind,
        "cardinality": cardinality,
    }
    assert (rules.relationship_violations(values) == []) == ok


def test_the_reference_lives_on_the_many_side() -> None:
    assert rules.reference_side("project__c", "account", "many_to_one") == rules.ReferenceSide(
        "project__c", "account"
    )
    assert rules.reference_side("account", "project__c", "one_to_many") == rules.ReferenceSide(
        "project__c", "account"
    )
    assert rules.reference_side("a__c", "b__c", "one_to_one").holder == "a__c"


def test_index_ddl_is_built_from_checked_parts() -> None:
    field_id, object_id = uuid.uuid4(), uuid.uuid4()
    sql = create_index_sql(IndexSpec(field_id, object_id, "budget", "currency", unique=False))
    assert sql == (
        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_cf_{field_id.hex} ON custom.custom_object_records "
        f"((custom.field_numeric(record_data, 'budget'))) WHERE custom_object_id = '{object_id}'::uuid"
    )
    unique = create_index_sql(IndexSpec(field_id, object_id, "sku", "text", unique=True))
    assert unique.startswith(f"CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS ux_cf_{field_id.hex}")
    assert drop_index_sql(field_id, True) == f"DROP INDEX CONCURRENTLY IF EXISTS custom.ux_cf_{field_id.hex}"
    with pytest.raises(ValueError):
        create_index_sql(IndexSpec(field_id, object_id, "x'); DROP TABLE t; --", "text", unique=False))
    with pytest.raises(ValueError):
        create_index_sql(IndexSpec(field_id, object_id, "notes", "textarea", unique=False))


def test_unindexable_types_are_refused() -> None:
    (violation,) = rules.index_violations(FieldDefinition("body", "textarea"), indexed=True)
    assert violation.field == "field.is_indexed"
    assert rules.index_violations(FieldDefinition("tags", "multipicklist", unique=True), indexed=False)
    assert rules.index_violations(FieldDefinition("amount", "currency"), indexed=True) == []


def test_data_type_must_follow_field_type() -> None:
    assert rules.data_type_violation("currency", "decimal") == []
    assert rules.data_type_violation("currency", "") == []
    (violation,) = rules.data_type_violation("currency", "varchar")
    assert "'decimal'" in violation.description


@pytest.mark.parametrize(("etag", "version"), [('W/"3"', 3), ('"7"', 7), ("12", 12), ("", None)])
def test_etags_parse(etag: str, version: int | None) -> None:
    assert rules.parse_etag(etag) == version


@pytest.mark.parametrize("etag", ['W/"x"', "W/", "1; DROP", '"' + "9" * 30 + '"'])
def test_bad_etags_are_refused(etag: str) -> None:
    with pytest.raises(ValueError):
        rules.parse_etag(etag)


def test_metadata_versions_and_impact() -> None:
    assert rules.definition_version(1) == "1.0.0"
    assert rules.definition_version(4) == "1.0.3"
    assert rules.performance_impact(FieldDefinition("a", "text"), indexed=False) == "low"
    assert rules.performance_impact(FieldDefinition("a", "text", unique=True), indexed=False) == "medium"
    assert (
        rules.performance_impact(FieldDefinition("a", "text", rules={"pattern": "^a$"}), indexed=True)
        == "high"
    )
    assert rules.compliance_tag_violations(["pii", "gdpr"]) == []
    assert rules.compliance_tag_violations(["PII"])
    assert rules.compliance_tag_violations([f"t{i}" for i in range(21)])


def test_usage_is_counted_in_memory_until_flushed() -> None:
    tracker = UsageTracker()
    field = uuid.uuid4()
    tracker.record("tenant-a", [field, field])
    tracker.record("tenant-b", [field])
    assert tracker.pending("tenant-a", field) == 2
    assert tracker.pending("tenant-c", field) == 0
    assert tracker.last_used(field) is not None
