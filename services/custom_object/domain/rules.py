"""Plain rules of custom-object definitions: names, limits, relationship cardinality, which
object holds a reference field, index eligibility and field metadata. No protobuf, no SQL."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from shared.errors import FieldViolation
from shared.fieldtypes import CORE_OBJECT_TYPES, FIELD_TYPES, REFERENCE_TYPES, FieldDefinition

#: Api names of objects, fields and relationships (the seed's CHECK constraint).
API_NAME: Final = re.compile(r"^[a-z][a-z0-9_]*[a-z0-9]$")
COLOR: Final = re.compile(r"^#[0-9A-Fa-f]{6}$")

#: Per-tenant limits; exceeding them is RESOURCE_EXHAUSTED.
MAX_OBJECTS_PER_TENANT: Final = 200
MAX_FIELDS_PER_OBJECT: Final = 500
MAX_RELATIONSHIPS_PER_TENANT: Final = 1000
#: Largest record_data, in bytes of canonical JSON.
MAX_RECORD_BYTES: Final = 64 * 1024
#: Largest many-to-many link data, in bytes of canonical JSON.
MAX_LINK_DATA_BYTES: Final = 16 * 1024
MAX_FIELD_NAME_LENGTH: Final = 63
MAX_COMPLIANCE_TAGS: Final = 20

#: Names a record already answers to in filters and order_by; custom fields cannot take them.
RESERVED_FIELD_NAMES: Final = frozenset(
    {"id", "create_time", "update_time", "created_by", "updated_by", "etag", "display_name",
     "object_type", "custom_object_id", "fields"}
)  # fmt: skip

RELATIONSHIP_TYPES: Final = ("lookup", "master_detail", "many_to_many")
CARDINALITIES: Final = ("one_to_one", "one_to_many", "many_to_one", "many_to_many")

#: Types a B-tree expression index cannot serve well (values up to 32 KiB, or lists).
UNINDEXABLE_TYPES: Final = frozenset({"textarea", "multipicklist", "url"})


def api_name_violations(path: str, value: str, max_length: int = 100) -> list[FieldViolation]:
    if not value:
        return [FieldViolation(path, "is required")]
    if len(value) > max_length:
        return [FieldViolation(path, f"must be at most {max_length} characters")]
    if not API_NAME.match(value):
        return [
            FieldViolation(
                path,
                "must start with a lower-case letter, contain only a-z, 0-9 and _, "
                "and not end in _ (^[a-z][a-z0-9_]*[a-z0-9]$)",
            )
        ]
    return []


def text_violations(path: str, value: str, *, required: bool, max_length: int) -> list[FieldViolation]:
    if required and not value.strip():
        return [FieldViolation(path, "is required")]
    if len(value) > max_length:
        return [FieldViolation(path, f"must be at most {max_length} characters")]
    return []


def object_violations(values: Mapping[str, Any], *, creating: bool) -> list[FieldViolation]:
    """Checks a custom object's attributes (those present, or all when creating)."""
    out: list[FieldViolation] = []
    p = "custom_object"
    if creating or "api_name" in values:
        api_name = str(values.get("api_name", ""))
        out += api_name_violations(f"{p}.api_name", api_name)
        if api_name in CORE_OBJECT_TYPES:
            out.append(FieldViolation(f"{p}.api_name", "is a core entity type"))
    for key, limit in (("name", 100), ("label", 255), ("plural_label", 255)):
        if creating or key in values:
            out += text_violations(f"{p}.{key}", str(values.get(key, "")), required=True, max_length=limit)
    if "description" in values:
        out += text_violations(
            f"{p}.description", str(values["description"] or ""), required=False, max_length=32768
        )
    if values.get("icon"):
        out += text_violations(f"{p}.icon", str(values["icon"]), required=False, max_length=50)
    if values.get("color") and not COLOR.match(str(values["color"])):
        out.append(FieldViolation(f"{p}.color", "must be a colour as #RRGGBB"))
    if values.get("record_name_field"):
        out += api_name_violations(f"{p}.record_name_field", str(values["record_name_field"]), 63)
    return out


def field_name_violations(path: str, name: str) -> list[FieldViolation]:
    out = api_name_violations(path, name, MAX_FIELD_NAME_LENGTH)
    if not out and name in RESERVED_FIELD_NAMES:
        out.append(FieldViolation(path, f"is reserved ({', '.join(sorted(RESERVED_FIELD_NAMES))})"))
    return out


def index_violations(definition: FieldDefinition, indexed: bool, path: str = "field") -> list[FieldViolation]:
    out: list[FieldViolation] = []
    if definition.field_type in UNINDEXABLE_TYPES:
        if indexed:
            out.append(
                FieldViolation(f"{path}.is_indexed", f"{definition.field_type} fields cannot be indexed")
            )
        if definition.unique:
            out.append(
                FieldViolation(f"{path}.is_unique", f"{definition.field_type} fields cannot be unique")
            )
    return out


def data_type_violation(
    field_type: str, data_type: str, path: str = "field.data_type"
) -> list[FieldViolation]:
    if not data_type or field_type not in FIELD_TYPES:
        return []
    expected = FIELD_TYPES[field_type].data_type
    if data_type != expected:
        return [FieldViolation(path, f"must be {expected!r} for {field_type} fields (or left empty)")]
    return []


@dataclass(frozen=True, slots=True)
class ReferenceSide:
    """Where a lookup / master_detail relationship stores its reference."""

    holder: str  # the object type whose records carry the reference field
    target: str  # the object type the reference points to


def reference_side(from_type: str, to_type: str, cardinality: str) -> ReferenceSide:
    """many_to_one and one_to_one keep the reference on the "from" object; one_to_many is the
    same relationship seen from the other end, so the reference lives on the "to" object."""
    if cardinality == "one_to_many":
        return ReferenceSide(holder=to_type, target=from_type)
    return ReferenceSide(holder=from_type, target=to_type)


def relationship_violations(values: Mapping[str, Any]) -> list[FieldViolation]:
    p = "relationship"
    out = api_name_violations(f"{p}.relationship_name", str(values.get("relationship_name", "")), 63)
    kind = values.get("relationship_type", "")
    cardinality = values.get("cardinality", "")
    if kind not in RELATIONSHIP_TYPES:
        out.append(
            FieldViolation(f"{p}.relationship_type", f"must be one of {', '.join(RELATIONSHIP_TYPES)}")
        )
    if cardinality not in CARDINALITIES:
        out.append(FieldViolation(f"{p}.cardinality", f"must be one of {', '.join(CARDINALITIES)}"))
    elif kind == "many_to_many" and cardinality != "many_to_many":
        out.append(FieldViolation(f"{p}.cardinality", "must be many_to_many for many_to_many relationships"))
    elif kind in ("lookup", "master_detail") and cardinality == "many_to_many":
        out.append(
            FieldViolation(f"{p}.cardinality", f"must be one_to_one, one_to_many or many_to_one for {kind}")
        )
    for key in ("from_object_type", "to_object_type"):
        out += api_name_violations(f"{p}.{key}", str(values.get(key, "")))
    if values.get("field_name"):
        out += field_name_violations(f"{p}.field_name", str(values["field_name"]))
    if kind == "many_to_many" and values.get("field_name"):
        out.append(FieldViolation(f"{p}.field_name", "many_to_many relationships have no reference field"))
    out += text_violations(
        f"{p}.description", str(values.get("description", "")), required=False, max_length=32768
    )
    return out


def compliance_tag_violations(
    tags: list[str], path: str = "field.metadata.compliance_tags"
) -> list[FieldViolation]:
    if len(tags) > MAX_COMPLIANCE_TAGS:
        return [FieldViolation(path, f"at most {MAX_COMPLIANCE_TAGS} tags")]
    bad = [t for t in tags if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,49}", t)]
    if bad:
        return [FieldViolation(path, f"tags are 1-50 lower-case letters, digits, _ . -: {bad[0][:60]!r}")]
    return []


def performance_impact(definition: FieldDefinition, indexed: bool) -> str:
    """ "low" for plain fields, "medium" when writes maintain an index, "high" when every write
    runs a tenant pattern or checks references against another object."""
    if definition.rules.get("pattern") or definition.field_type in REFERENCE_TYPES:
        return "high"
    if indexed or definition.unique:
        return "medium"
    return "low"


def definition_version(version: int) -> str:
    """A field's definition version as the seed's semantic string: 1.0.0 at creation."""
    return f"1.0.{max(version - 1, 0)}"


def parse_etag(etag: str) -> int | None:
    """The version in `W/"<n>"` (or a bare number); None when no etag was sent."""
    if not etag:
        return None
    match = re.fullmatch(r'(?:W/)?"?(\d{1,18})"?', etag.strip())
    if match is None:
        raise ValueError("is not an etag this service issued")
    return int(match.group(1))
