"""AIP-160 filters and AIP-132 `order_by`, parsed against a whitelist of fields and compiled to
SQLAlchemy expressions with bound parameters. No SQL text is ever assembled from client input:
a field name must be in the whitelist, a value is parsed into the field's Python type and bound.

Usage::

    fields = FieldSet([
        Field("name", FieldType.STRING, accounts.c.name),
        Field("annual_revenue", FieldType.DECIMAL, accounts.c.annual_revenue),
        Field("created_at", FieldType.TIMESTAMP, accounts.c.created_at),
        Field("type", FieldType.ENUM, accounts.c.account_type, choices={"prospect", "customer"}),
        # custom fields: any column expression, e.g. a typed JSONB expression that matches an
        # expression index: cast(accounts.c.custom_fields["budget"].astext, Numeric)
        Field("custom_fields.budget", FieldType.DECIMAL, budget_expr),
    ], tiebreaker=accounts.c.id)
    condition = fields.filter('name:"acme" AND (annual_revenue >= 1000 OR type = customer)')
    order = fields.order_by("annual_revenue desc, name")          # list[SortKey]
    stmt = select(...).where(condition).order_by(*fields.order_clauses(order))
    # keyset paging: the cursor is the last row's sort values (JSON-safe) plus its tiebreaker
    cursor = fields.cursor_of(order, last_row_mapping_by_field_name_plus_"id")
    stmt = stmt.where(fields.after(order, cursor))

Grammar (AIP-160 subset; OR binds tighter than AND, as AIP-160 specifies)::

    filter      := conjunction
    conjunction := disjunction ("AND" disjunction)*
    disjunction := factor ("OR" factor)*
    factor      := ["NOT" | "-"] ( "(" conjunction ")" | comparison )
    comparison  := field op value
    op          := "=" | "!=" | "<" | "<=" | ">" | ">=" | ":"
    value       := "quoted string" | 'quoted string' | number | true | false | null | bare_word

`:` (has) means case-insensitive substring for strings and membership for string lists.
`field = null` / `field != null` test for absence. Every error is INVALID_ARGUMENT naming
`filter` or `order_by` and saying what is wrong and where.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, false, not_, or_, true
from sqlalchemy.sql.elements import ColumnElement

from shared.errors import invalid

MAX_FILTER_LENGTH = 2000
MAX_COMPARISONS = 50
MAX_DEPTH = 16
MAX_ORDER_KEYS = 5
MAX_DECIMAL_EXPONENT = 100


class FieldType(enum.StrEnum):
    STRING = "string"
    INTEGER = "integer"
    DECIMAL = "decimal"
    BOOLEAN = "boolean"
    DATE = "date"
    TIMESTAMP = "timestamp"
    UUID = "uuid"
    ENUM = "enum"
    STRING_LIST = "string_list"


@dataclass(frozen=True)
class Field:
    """A field clients may filter (and, when `sortable`, sort) on, and the column it maps to."""

    name: str
    type: FieldType
    column: Any  # a SQLAlchemy column expression
    sortable: bool = True
    choices: frozenset[str] | set[str] | None = None


@dataclass(frozen=True, slots=True)
class SortKey:
    field: Field
    descending: bool


@dataclass
class FieldSet:
    fields: Iterable[Field]
    tiebreaker: Any  # a unique, non-null column (the id) that ends every ordering
    by_name: dict[str, Field] = field(init=False)

    def __post_init__(self) -> None:
        self.by_name = {f.name: f for f in self.fields}

    # --- filter ---------------------------------------------------------------------------

    def filter(self, text: str) -> ColumnElement[bool]:
        """The SQL condition for a filter string; an empty filter matches everything."""
        if not text or not text.strip():
            return true()
        if len(text) > MAX_FILTER_LENGTH:
            raise invalid("filter", f"must be at most {MAX_FILTER_LENGTH} characters")
        parser = _Parser(_tokenize(text), self.by_name)
        condition = parser.conjunction(0)
        parser.expect_end()
        return condition

    # --- order_by -------------------------------------------------------------------------

    def order_by(self, text: str, default: Sequence[tuple[str, bool]] = ()) -> list[SortKey]:
        """Parses `"name desc, created_at"`; only sortable whitelisted fields are accepted."""
        if not text or not text.strip():
            return [SortKey(self.by_name[name], desc) for name, desc in default]
        keys: list[SortKey] = []
        seen: set[str] = set()
        for part in text.split(","):
            words = part.split()
            if not words or len(words) > 2:
                raise invalid("order_by", f"{part.strip()!r} is not 'field' or 'field desc'")
            name = words[0]
            descending = False
            if len(words) == 2:
                if words[1].lower() not in ("asc", "desc"):
                    raise invalid("order_by", f"direction must be asc or desc, not {words[1]!r}")
                descending = words[1].lower() == "desc"
            known = self.by_name.get(name)
            if known is None or not known.sortable:
                raise invalid(
                    "order_by", f"cannot sort by {name!r}; sortable fields: {self.sortable_names()}"
                )
            if name in seen:
                raise invalid("order_by", f"{name!r} appears twice")
            seen.add(name)
            keys.append(SortKey(known, descending))
        if len(keys) > MAX_ORDER_KEYS:
            raise invalid("order_by", f"at most {MAX_ORDER_KEYS} sort keys")
        return keys

    def sortable_names(self) -> str:
        return ", ".join(sorted(name for name, f in self.by_name.items() if f.sortable))

    def order_clauses(self, keys: Sequence[SortKey]) -> list[Any]:
        # PostgreSQL's defaults (ASC NULLS LAST, DESC NULLS FIRST) treat NULL as the largest
        # value; `after` relies on exactly that.
        clauses = [k.field.column.desc() if k.descending else k.field.column.asc() for k in keys]
        descending_tiebreak = bool(keys) and keys[-1].descending
        clauses.append(self.tiebreaker.desc() if descending_tiebreak else self.tiebreaker.asc())
        return clauses

    # --- keyset paging --------------------------------------------------------------------

    def cursor_of(
        self, keys: Sequence[SortKey], row: Mapping[str, Any], tiebreak_key: str = "id"
    ) -> list[Any]:
        """The JSON-safe cursor of the last row on a page: its sort values, then its id."""
        return [_to_json(row.get(k.field.name)) for k in keys] + [str(row[tiebreak_key])]

    def after(self, keys: Sequence[SortKey], cursor: Sequence[Any]) -> ColumnElement[bool]:
        """Rows strictly after the cursor in the given order (lexicographic, NULL largest)."""
        if len(cursor) != len(keys) + 1:
            raise invalid("page_token", "does not match the order_by it is used with")
        values = [_from_json(k.field, v) for k, v in zip(keys, cursor[:-1], strict=True)]
        try:
            tiebreak_value = uuid.UUID(str(cursor[-1]))
        except ValueError as exc:
            raise invalid("page_token", "is not a token this method issued") from exc
        descending_tiebreak = bool(keys) and keys[-1].descending
        tiebreak_after = (
            self.tiebreaker < tiebreak_value if descending_tiebreak else self.tiebreaker > tiebreak_value
        )
        # (k1 after v1) OR (k1 = v1 AND k2 after v2) OR ... OR (all equal AND id after)
        alternatives: list[ColumnElement[bool]] = []
        ties: list[ColumnElement[bool]] = []
        for key, value in zip(keys, values, strict=True):
            alternatives.append(and_(*ties, _strictly_after(key, value)))
            ties.append(key.field.column.is_(None) if value is None else key.field.column == value)
        alternatives.append(and_(*ties, tiebreak_after))
        return or_(*alternatives)


def _strictly_after(key: SortKey, value: Any) -> ColumnElement[bool]:
    column = key.field.column
    if key.descending:
        # NULLs come first when descending: after a NULL, every non-NULL value follows.
        return column.is_not(None) if value is None else column < value  # type: ignore[no-any-return]
    # NULLs come last when ascending: nothing is strictly after a NULL.
    return false() if value is None else or_(column > value, column.is_(None))


def _to_json(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    return value


def _from_json(f: Field, value: Any) -> Any:
    if value is None or (isinstance(value, bool | int) and f.type in (FieldType.BOOLEAN, FieldType.INTEGER)):
        return value
    try:
        return _convert(f, str(value))
    except ValueError as exc:
        raise invalid("page_token", "is not a token this method issued") from exc


# --- tokenizer and parser -------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<lparen>\() | (?P<rparen>\)) |
        (?P<op><=|>=|!=|=|<|>|:) |
        (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*') |
        (?P<word>[A-Za-z0-9_.+\-@]+(?::[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?(?:Z|[+-][0-9]{2}:[0-9]{2})?)?)
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    text: str
    position: int


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            offending = text[position:].lstrip()[:1]
            raise invalid("filter", f"unexpected character {offending!r} at position {position}")
        kind = match.lastgroup or ""
        tokens.append(_Token(kind, match.group(kind), match.start(kind)))
        position = match.end()
    return tokens


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


class _Parser:
    def __init__(self, tokens: list[_Token], fields: dict[str, Field]) -> None:
        self._tokens = tokens
        self._index = 0
        self._fields = fields
        self._comparisons = 0

    def _peek(self) -> _Token | None:
        return self._tokens[self._index] if self._index < len(self._tokens) else None

    def _next(self, expected: str) -> _Token:
        token = self._peek()
        if token is None:
            raise invalid("filter", f"ends too early: expected {expected}")
        self._index += 1
        return token

    def _keyword(self, word: str) -> bool:
        token = self._peek()
        if token is not None and token.kind == "word" and token.text == word:
            self._index += 1
            return True
        return False

    def expect_end(self) -> None:
        token = self._peek()
        if token is not None:
            raise invalid("filter", f"unexpected {token.text!r} at position {token.position}")

    def conjunction(self, depth: int) -> ColumnElement[bool]:
        parts = [self.disjunction(depth)]
        while self._keyword("AND"):
            parts.append(self.disjunction(depth))
        return parts[0] if len(parts) == 1 else and_(*parts)

    def disjunction(self, depth: int) -> ColumnElement[bool]:
        parts = [self.factor(depth)]
        while self._keyword("OR"):
            parts.append(self.factor(depth))
        return parts[0] if len(parts) == 1 else or_(*parts)

    def factor(self, depth: int) -> ColumnElement[bool]:
        if depth > MAX_DEPTH:
            raise invalid("filter", f"nests deeper than {MAX_DEPTH} levels")
        negate = self._keyword("NOT")
        token = self._peek()
        if not negate and token is not None and token.kind == "word" and token.text == "-":
            self._index += 1
            negate = True
        token = self._peek()
        if token is not None and token.kind == "lparen":
            self._index += 1
            inner = self.conjunction(depth + 1)
            closing = self._next("')'")
            if closing.kind != "rparen":
                raise invalid("filter", f"expected ')' at position {closing.position}")
            return not_(inner) if negate else inner
        comparison = self.comparison()
        return not_(comparison) if negate else comparison

    def comparison(self) -> ColumnElement[bool]:
        self._comparisons += 1
        if self._comparisons > MAX_COMPARISONS:
            raise invalid("filter", f"has more than {MAX_COMPARISONS} comparisons")
        name_token = self._next("a field name")
        if name_token.kind != "word" or name_token.text in ("AND", "OR", "NOT"):
            raise invalid("filter", f"expected a field name at position {name_token.position}")
        known = self._fields.get(name_token.text)
        if known is None:
            raise invalid(
                "filter", f"unknown field {name_token.text!r}; filterable fields: {sorted(self._fields)}"
            )
        op_token = self._next("an operator")
        if op_token.kind != "op":
            raise invalid(
                "filter", f"expected an operator after {known.name!r} at position {op_token.position}"
            )
        value_token = self._next("a value")
        if value_token.kind not in ("word", "string"):
            raise invalid("filter", f"expected a value at position {value_token.position}")
        raw = _unquote(value_token.text) if value_token.kind == "string" else value_token.text
        return _compile(known, op_token.text, raw, value_token.kind == "string")


def _convert(f: Field, raw: str) -> Any:
    if f.type in (FieldType.STRING, FieldType.STRING_LIST):
        return raw
    if f.type is FieldType.ENUM:
        if f.choices is not None and raw not in f.choices:
            raise ValueError(f"must be one of {sorted(f.choices)}")
        return raw
    if f.type is FieldType.INTEGER:
        number = int(raw)
        if not -(2**63) <= number < 2**63:
            raise ValueError("outside the 64-bit integer range")
        return number
    if f.type is FieldType.DECIMAL:
        try:
            value = decimal.Decimal(raw)
        except decimal.InvalidOperation as exc:
            raise ValueError("not a number") from exc
        # Bounded so that PostgreSQL never sees a numeric it overflows on (an INTERNAL error).
        if not value.is_finite() or abs(value.adjusted()) > MAX_DECIMAL_EXPONENT:
            raise ValueError(f"not a finite number within 1e±{MAX_DECIMAL_EXPONENT}")
        return value
    if f.type is FieldType.BOOLEAN:
        if raw not in ("true", "false"):
            raise ValueError("must be true or false")
        return raw == "true"
    if f.type is FieldType.DATE:
        return dt.date.fromisoformat(raw)
    if f.type is FieldType.TIMESTAMP:
        stamp = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)
    if f.type is FieldType.UUID:
        return uuid.UUID(raw)
    raise ValueError(f"unsupported type {f.type}")


_ORDERING_TYPES = {
    FieldType.INTEGER,
    FieldType.DECIMAL,
    FieldType.DATE,
    FieldType.TIMESTAMP,
    FieldType.STRING,
}


def _compile(f: Field, op: str, raw: str, quoted: bool) -> ColumnElement[bool]:
    column = f.column
    if raw == "null" and not quoted:
        if op == "=":
            return column.is_(None)  # type: ignore[no-any-return]
        if op == "!=":
            return column.is_not(None)  # type: ignore[no-any-return]
        raise invalid("filter", f"null can only be compared with = or != (field {f.name!r})")
    if op == ":":
        if f.type is FieldType.STRING:
            escaped = raw.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            return column.ilike(f"%{escaped}%", escape="\\")  # type: ignore[no-any-return]
        if f.type is FieldType.STRING_LIST:
            return column.contains([raw])  # type: ignore[no-any-return]
        raise invalid("filter", f"':' (has) applies to text and list fields, not {f.name!r} ({f.type})")
    if f.type is FieldType.STRING_LIST:
        raise invalid("filter", f"{f.name!r} is a list: use ':' to test membership")
    try:
        value = _convert(f, raw)
    except ValueError as exc:
        raise invalid("filter", f"{raw!r} is not a valid {f.type} for {f.name!r}: {exc}") from exc
    if op == "=":
        return column == value  # type: ignore[no-any-return]
    if op == "!=":
        return column != value  # type: ignore[no-any-return]
    if f.type not in _ORDERING_TYPES:
        raise invalid("filter", f"{op!r} does not apply to {f.name!r} ({f.type}); use = or !=")
    comparisons = {"<": column < value, "<=": column <= value, ">": column > value, ">=": column >= value}
    return comparisons[op]  # type: ignore[no-any-return]
