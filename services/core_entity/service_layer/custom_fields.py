"""Custom field values of core records, checked against the tenant's field definitions.

The definitions live in the custom-object service of the same shard; `DefinitionSource` reads
them (over gRPC in production, from a dict in tests). `CustomFields` caches them per tenant and
entity type and forgets a tenant's entries when a definition-change control event arrives (and
after `ttl_seconds` anyway, as a safety net for a lost event). Each load of definitions is shown
to the index keeper, which builds missing custom field indexes in the background.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from shared.errors import FieldViolation
from shared.fieldtypes import FieldDefinition, required_violations, validate_values


class DefinitionSource(Protocol):
    async def definitions(self, tenant_id: str, entity_type: str) -> list[FieldDefinition]: ...


class IndexKeeping(Protocol):
    """Keeps the indexes that loaded definitions ask for (adapters.indexes.IndexKeeper)."""

    def ensure(self, tenant_id: str, entity_type: str, definitions: Iterable[FieldDefinition]) -> None:
        """Starts what is needed in the background; returns at once and never raises."""
        ...

    def forget(self, tenant_id: str | None = None) -> None: ...


class NoDefinitions:
    """Used when no custom-object service is configured: every record has no custom fields,
    so any key is unknown."""

    async def definitions(self, tenant_id: str, entity_type: str) -> list[FieldDefinition]:
        return []


class CustomFields:
    def __init__(
        self, source: DefinitionSource, ttl_seconds: float = 300.0, indexes: IndexKeeping | None = None
    ) -> None:
        self._source = source
        self._ttl = ttl_seconds
        self._indexes = indexes
        self._cache: dict[tuple[str, str], tuple[float, list[FieldDefinition]]] = {}

    def forget(self, tenant_id: str | None = None) -> None:
        """Drops cached definitions of one tenant (or of all tenants); their indexes are checked
        again on the next load, so a field newly marked indexed gets its index."""
        if self._indexes is not None:
            self._indexes.forget(tenant_id)
        if tenant_id is None:
            self._cache.clear()
            return
        for key in [k for k in self._cache if k[0] == tenant_id]:
            del self._cache[key]

    async def definitions(self, tenant_id: str, entity_type: str) -> list[FieldDefinition]:
        key = (tenant_id, entity_type)
        cached = self._cache.get(key)
        if cached is not None and time.monotonic() - cached[0] < self._ttl:
            return cached[1]
        found = await self._source.definitions(tenant_id, entity_type)
        self._cache[key] = (time.monotonic(), found)
        if self._indexes is not None:
            self._indexes.ensure(tenant_id, entity_type, found)
        return found

    async def types(self, tenant_id: str, entity_type: str) -> dict[str, str]:
        return {d.name: d.field_type for d in await self.definitions(tenant_id, entity_type)}

    async def clean(
        self,
        tenant_id: str,
        entity_type: str,
        given: Mapping[str, Any],
        stored: Mapping[str, Any] | None,
        prefix: str,
    ) -> tuple[dict[str, Any], list[FieldViolation]]:
        """The custom_fields to store: on create (`stored` None) the given values with defaults
        applied; on update the stored values with the given ones checked and merged over them
        (None removes a key). Violations name `<prefix>.<key>` and the rule."""
        definitions = await self.definitions(tenant_id, entity_type)
        if stored is None:
            result = validate_values(given, definitions, partial=False, prefix=prefix)
            return result.values, result.violations
        result = validate_values(given, definitions, partial=True, prefix=prefix)
        if result.violations:
            return {}, result.violations
        merged = {k: v for k, v in stored.items() if k not in given}
        merged.update(result.values)
        return merged, required_violations(merged, definitions, prefix)
