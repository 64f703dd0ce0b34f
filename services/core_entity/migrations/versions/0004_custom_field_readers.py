"""Typed readers of one key of `custom_fields`, for the custom field indexes and the filters and
sorts that use them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26

Indexes on custom fields (`is_indexed` or `is_unique` definitions) are built later, per tenant and
field, with CREATE INDEX CONCURRENTLY by the service's index builder
(services/core_entity/adapters/indexes.py). The expressions they index call these readers,
because the built-in text-to-date and text-to-timestamptz casts are only STABLE and PostgreSQL
refuses them in an index. They are IMMUTABLE in fact: they accept only the canonical forms the
service stores (YYYY-MM-DD; YYYY-MM-DDTHH:MM:SS.ffffff+00:00), which read the same under every
DateStyle and TimeZone.

They have the same names and bodies as the custom-object service's `custom.field_*` readers, but
live in schema `core`: each service owns its schema, and core's indexes must not depend on
objects another service's migrations may change or drop.
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: Every reader taking (jsonb, text); iso_date(text) is their helper.
READERS = ("field_text", "field_bigint", "field_numeric", "field_boolean", "field_date", "field_timestamptz")

STATEMENTS = [
    # They return NULL for a value not in the stored canonical form instead of raising: a
    # filter must never fail on one odd value, and PostgreSQL may evaluate it on rows before
    # the tenant condition. Since they can never raise, a superuser may mark them LEAKPROOF
    # (see docs/core-entity.md) so that row-level security lets filters use the indexes. The
    # CASE bodies keep PostgreSQL from inlining them, so index and query expressions stay equal.
    """CREATE FUNCTION core.field_text(doc jsonb, key text) RETURNS text
       LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
       SELECT CASE WHEN jsonb_typeof(doc -> key) = 'string' THEN doc ->> key END $$""",
    """CREATE FUNCTION core.field_bigint(doc jsonb, key text) RETURNS bigint
       LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
       SELECT CASE WHEN (doc ->> key) ~ '^-?[0-9]{1,18}$' THEN (doc ->> key)::bigint END $$""",
    """CREATE FUNCTION core.field_numeric(doc jsonb, key text) RETURNS numeric
       LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
       SELECT CASE WHEN (doc ->> key) ~ '^-?[0-9]{1,20}(\\.[0-9]{1,12})?$' THEN (doc ->> key)::numeric END $$""",
    """CREATE FUNCTION core.field_boolean(doc jsonb, key text) RETURNS boolean
       LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
       SELECT CASE WHEN jsonb_typeof(doc -> key) = 'boolean' THEN (doc -> key)::boolean END $$""",
    """CREATE FUNCTION core.iso_date(value text) RETURNS date
       LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
       SELECT CASE WHEN value ~ '^(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$'
         AND extract(month FROM make_date(substr(value, 1, 4)::int, substr(value, 6, 2)::int, 1)
                               + (substr(value, 9, 2)::int - 1)) = substr(value, 6, 2)::int
       THEN make_date(substr(value, 1, 4)::int, substr(value, 6, 2)::int, substr(value, 9, 2)::int) END $$""",
    """CREATE FUNCTION core.field_date(doc jsonb, key text) RETURNS date
       LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
       SELECT CASE WHEN jsonb_typeof(doc -> key) = 'string' THEN core.iso_date(doc ->> key) END $$""",
    """CREATE FUNCTION core.field_timestamptz(doc jsonb, key text) RETURNS timestamptz
       LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
       SELECT CASE WHEN (doc ->> key) ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]\\.[0-9]{6}\\+00:00$'
       THEN (core.iso_date(substr(doc ->> key, 1, 10)) + substr(doc ->> key, 12, 15)::time) AT TIME ZONE 'UTC' END $$""",
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    # CASCADE: the custom field indexes built on them go too (they are rebuilt on demand).
    for function in READERS:
        op.execute(f"DROP FUNCTION IF EXISTS core.{function}(jsonb, text) CASCADE")
    op.execute("DROP FUNCTION IF EXISTS core.iso_date(text) CASCADE")
