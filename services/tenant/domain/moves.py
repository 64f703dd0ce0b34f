"""Rules of a tenant move that need no database: the move's phases, the order tables are copied
and cleaned in, and whether rows vanished between two readings of the source."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

PHASES = ("pending", "copying", "catching_up", "blocked", "cleaning_up", "completed", "failed")
FINISHED = ("completed", "failed")


@dataclass(frozen=True, slots=True)
class TableInfo:
    """One tenant table of a shard: its columns (generated ones left out), primary key and the
    tables its foreign keys point at."""

    schema: str
    name: str
    columns: tuple[str, ...]
    primary_key: tuple[str, ...]
    depends_on: frozenset[str] = field(default_factory=frozenset)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


def copy_order(tables: list[TableInfo]) -> list[TableInfo]:
    """Parents before children, so foreign keys hold while copying; ties by name so the order
    is stable. Self-references are ignored (one statement per table copies a whole tree);
    cycles between tables fall back to name order for the tables left."""
    by_name = {t.qualified: t for t in tables}
    remaining = dict(by_name)
    ordered: list[TableInfo] = []
    while remaining:
        ready = sorted(
            name
            for name, table in remaining.items()
            if not ({d for d in table.depends_on if d in remaining} - {name})
        )
        if not ready:
            ready = sorted(remaining)[:1]
        for name in ready:
            ordered.append(remaining.pop(name))
    return ordered


@dataclass(frozen=True, slots=True)
class Delta:
    upsert: list[str]
    delete: list[str]

    @property
    def size(self) -> int:
        return len(self.upsert) + len(self.delete)


def rows_vanished(known: Collection[str], written: Collection[str], count: int) -> bool:
    """Whether rows were deleted from a source table since `known` (its primary keys then) was
    read, given the keys written since and the table's row count now: without deletions the
    count is every known row plus each written row that is new."""
    return count != len(known) + sum(1 for key in written if key not in known)
