"""Custom objects, fields, picklist options, relationships, records and many-to-many links.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

Every table carries tenant_id with forced row-level security, and references between them are
composite (tenant_id, id) keys so a reference can never cross tenants.

Field indexes (`is_indexed`, `is_unique`) are built later, per field, with CREATE INDEX
CONCURRENTLY by the service's index builder (services/custom_object/adapters/indexes.py). The
typed expressions they index use the IMMUTABLE readers created here (custom.field_numeric,
field_date...), because the built-in text-to-date and text-to-timestamptz casts are only STABLE and
PostgreSQL refuses them in an index. They are IMMUTABLE in fact: they accept only the canonical
forms the service stores (YYYY-MM-DD; YYYY-MM-DDTHH:MM:SS.ffffff+00:00), which read the same
under every DateStyle and TimeZone.
"""

from alembic import op

from shared.db import rls_statements

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

CORE_TYPES = "('account', 'contact', 'lead', 'deal', 'activity')"
FIELD_TYPES = (
    "('text', 'textarea', 'number', 'decimal', 'currency', 'percent', 'date', 'datetime', "
    "'boolean', 'picklist', 'multipicklist', 'email', 'phone', 'url', 'lookup', 'master_detail')"
)
API_NAME = "'^[a-z][a-z0-9_]*[a-z0-9]$'"

TABLES = ["custom_objects", "custom_fields", "custom_field_options", "custom_relationships",
          "custom_object_records", "custom_relationship_data"]  # fmt: skip

STATEMENTS = [
    # Typed readers of one key of record_data, for the expression indexes and the typed filters
    # and sorts that use them. They return NULL for a value not in the stored canonical form
    # instead of raising, because PostgreSQL may evaluate a filter on rows of another object
    # whose field of the same name has another type before it evaluates the object condition;
    # and since they can never raise, a superuser may mark them LEAKPROOF (see
    # docs/custom-objects.md) so that row-level security lets filters use the indexes. The CASE
    # bodies keep PostgreSQL from inlining them, so index and query expressions stay the same.
    """CREATE FUNCTION custom.field_text(doc jsonb, key text) RETURNS text
       LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
       SELECT CASE WHEN jsonb_typeof(doc -> key) = 'string' THEN doc ->> key END $$""",
    """CREATE FUNCTION custom.field_bigint(doc jsonb, key text) RETURNS bigint
       LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
       SELECT CASE WHEN (doc ->> key) ~ '^-?[0-9]{1,18}$' THEN (doc ->> key)::bigint END $$""",
    """CREATE FUNCTION custom.field_numeric(doc jsonb, key text) RETURNS numeric
       LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
       SELECT CASE WHEN (doc ->> key) ~ '^-?[0-9]{1,20}(\\.[0-9]{1,12})?$' THEN (doc ->> key)::numeric END $$""",
    """CREATE FUNCTION custom.field_boolean(doc jsonb, key text) RETURNS boolean
       LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
       SELECT CASE WHEN jsonb_typeof(doc -> key) = 'boolean' THEN (doc -> key)::boolean END $$""",
    """CREATE FUNCTION custom.iso_date(value text) RETURNS date
       LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
       SELECT CASE WHEN value ~ '^(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$'
         AND extract(month FROM make_date(substr(value, 1, 4)::int, substr(value, 6, 2)::int, 1)
                               + (substr(value, 9, 2)::int - 1)) = substr(value, 6, 2)::int
       THEN make_date(substr(value, 1, 4)::int, substr(value, 6, 2)::int, substr(value, 9, 2)::int) END $$""",
    """CREATE FUNCTION custom.field_date(doc jsonb, key text) RETURNS date
       LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
       SELECT CASE WHEN jsonb_typeof(doc -> key) = 'string' THEN custom.iso_date(doc ->> key) END $$""",
    """CREATE FUNCTION custom.field_timestamptz(doc jsonb, key text) RETURNS timestamptz
       LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
       SELECT CASE WHEN (doc ->> key) ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]\\.[0-9]{6}\\+00:00$'
       THEN (custom.iso_date(substr(doc ->> key, 1, 10)) + substr(doc ->> key, 12, 15)::time) AT TIME ZONE 'UTC' END $$""",
    f"""CREATE TABLE custom.custom_objects (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL,
        name varchar(100) NOT NULL,
        label varchar(255) NOT NULL,
        plural_label varchar(255) NOT NULL,
        description text NOT NULL DEFAULT '',
        api_name varchar(100) NOT NULL,
        is_active boolean NOT NULL DEFAULT true,
        allow_reports boolean NOT NULL DEFAULT true,
        allow_activities boolean NOT NULL DEFAULT true,
        record_name_field varchar(100),
        icon varchar(50),
        color varchar(7),
        version bigint NOT NULL DEFAULT 1,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        created_by uuid,
        updated_by uuid,
        CONSTRAINT uq_custom_objects_tenant_id UNIQUE (tenant_id, id),
        CONSTRAINT uq_custom_objects_name UNIQUE (tenant_id, name),
        CONSTRAINT uq_custom_objects_api_name UNIQUE (tenant_id, api_name),
        CONSTRAINT ck_custom_objects_api_name CHECK (api_name ~ {API_NAME}),
        CONSTRAINT ck_custom_objects_not_core CHECK (api_name NOT IN {CORE_TYPES}),
        CONSTRAINT ck_custom_objects_color CHECK (color IS NULL OR color ~ '^#[0-9A-Fa-f]{{6}}$')
    )""",
    "CREATE INDEX ix_custom_objects_active ON custom.custom_objects (tenant_id, is_active)",
    f"""CREATE TABLE custom.custom_fields (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL,
        object_type varchar(100) NOT NULL,
        custom_object_id uuid,
        field_name varchar(63) NOT NULL,
        field_label varchar(255) NOT NULL,
        field_type varchar(50) NOT NULL,
        data_type varchar(50) NOT NULL,
        is_required boolean NOT NULL DEFAULT false,
        is_unique boolean NOT NULL DEFAULT false,
        is_indexed boolean NOT NULL DEFAULT false,
        default_value jsonb,
        help_text text NOT NULL DEFAULT '',
        field_order integer NOT NULL DEFAULT 0,
        validation_rules jsonb NOT NULL DEFAULT '{{}}',
        display_options jsonb NOT NULL DEFAULT '{{}}',
        is_active boolean NOT NULL DEFAULT true,
        reference_object_type varchar(100),
        relationship_id uuid,
        metadata jsonb NOT NULL DEFAULT '{{}}',
        usage_count bigint NOT NULL DEFAULT 0,
        last_used_at timestamptz,
        index_state varchar(20) NOT NULL DEFAULT 'none',
        version bigint NOT NULL DEFAULT 1,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        created_by uuid,
        updated_by uuid,
        CONSTRAINT uq_custom_fields_tenant_id UNIQUE (tenant_id, id),
        CONSTRAINT uq_custom_fields_name UNIQUE (tenant_id, object_type, field_name),
        CONSTRAINT fk_custom_fields_object FOREIGN KEY (tenant_id, custom_object_id)
            REFERENCES custom.custom_objects (tenant_id, id) ON DELETE CASCADE,
        CONSTRAINT ck_custom_fields_name CHECK (field_name ~ {API_NAME}),
        CONSTRAINT ck_custom_fields_type CHECK (field_type IN {FIELD_TYPES}),
        CONSTRAINT ck_custom_fields_data_type CHECK (data_type IN (
            'varchar', 'text', 'integer', 'decimal', 'boolean', 'date', 'timestamp', 'jsonb', 'uuid')),
        CONSTRAINT ck_custom_fields_object_consistency CHECK (
            (object_type IN {CORE_TYPES} AND custom_object_id IS NULL) OR
            (object_type NOT IN {CORE_TYPES} AND custom_object_id IS NOT NULL)),
        CONSTRAINT ck_custom_fields_index_state CHECK (
            index_state IN ('none', 'building', 'ready', 'failed'))
    )""",
    "CREATE INDEX ix_custom_fields_object ON custom.custom_fields (tenant_id, object_type)",
    "CREATE INDEX ix_custom_fields_custom_object ON custom.custom_fields (tenant_id, custom_object_id)",
    """CREATE TABLE custom.custom_field_options (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL,
        custom_field_id uuid NOT NULL,
        option_value varchar(255) NOT NULL,
        option_label varchar(255) NOT NULL,
        option_order integer NOT NULL DEFAULT 0,
        is_default boolean NOT NULL DEFAULT false,
        is_active boolean NOT NULL DEFAULT true,
        created_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT fk_custom_field_options_field FOREIGN KEY (tenant_id, custom_field_id)
            REFERENCES custom.custom_fields (tenant_id, id) ON DELETE CASCADE,
        CONSTRAINT uq_custom_field_options_value UNIQUE (custom_field_id, option_value),
        CONSTRAINT uq_custom_field_options_order UNIQUE (custom_field_id, option_order)
    )""",
    "CREATE INDEX ix_custom_field_options_tenant ON custom.custom_field_options (tenant_id, custom_field_id)",
    """CREATE TABLE custom.custom_relationships (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL,
        relationship_name varchar(100) NOT NULL,
        from_object_type varchar(100) NOT NULL,
        from_custom_object_id uuid,
        to_object_type varchar(100) NOT NULL,
        to_custom_object_id uuid,
        relationship_type varchar(50) NOT NULL,
        cardinality varchar(20) NOT NULL,
        cascade_delete boolean NOT NULL DEFAULT false,
        is_required boolean NOT NULL DEFAULT false,
        description text NOT NULL DEFAULT '',
        holder_object_type varchar(100),
        field_id uuid,
        version bigint NOT NULL DEFAULT 1,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        created_by uuid,
        updated_by uuid,
        CONSTRAINT uq_custom_relationships_tenant_id UNIQUE (tenant_id, id),
        CONSTRAINT uq_custom_relationships_name UNIQUE (tenant_id, relationship_name),
        CONSTRAINT fk_custom_relationships_from FOREIGN KEY (tenant_id, from_custom_object_id)
            REFERENCES custom.custom_objects (tenant_id, id) ON DELETE CASCADE,
        CONSTRAINT fk_custom_relationships_to FOREIGN KEY (tenant_id, to_custom_object_id)
            REFERENCES custom.custom_objects (tenant_id, id) ON DELETE CASCADE,
        CONSTRAINT ck_custom_relationships_type CHECK (
            relationship_type IN ('lookup', 'master_detail', 'many_to_many')),
        CONSTRAINT ck_custom_relationships_cardinality CHECK (
            cardinality IN ('one_to_one', 'one_to_many', 'many_to_one', 'many_to_many')),
        CONSTRAINT ck_custom_relationships_type_cardinality CHECK (
            (relationship_type = 'many_to_many' AND cardinality = 'many_to_many') OR
            (relationship_type IN ('lookup', 'master_detail')
             AND cardinality IN ('one_to_one', 'one_to_many', 'many_to_one')))
    )""",
    "CREATE INDEX ix_custom_relationships_from ON custom.custom_relationships (tenant_id, from_object_type)",
    "CREATE INDEX ix_custom_relationships_to ON custom.custom_relationships (tenant_id, to_object_type)",
    """CREATE TABLE custom.custom_object_records (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL,
        custom_object_id uuid NOT NULL,
        record_data jsonb NOT NULL DEFAULT '{}',
        version bigint NOT NULL DEFAULT 1,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        created_by uuid,
        updated_by uuid,
        CONSTRAINT uq_custom_object_records_tenant_id UNIQUE (tenant_id, id),
        CONSTRAINT fk_custom_object_records_object FOREIGN KEY (tenant_id, custom_object_id)
            REFERENCES custom.custom_objects (tenant_id, id) ON DELETE CASCADE,
        CONSTRAINT ck_custom_object_records_object CHECK (jsonb_typeof(record_data) = 'object')
    )""",
    """CREATE INDEX ix_custom_object_records_object
       ON custom.custom_object_records (tenant_id, custom_object_id, created_at, id)""",
    """CREATE TABLE custom.custom_relationship_data (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL,
        relationship_id uuid NOT NULL,
        from_record_id uuid NOT NULL,
        to_record_id uuid NOT NULL,
        relationship_data jsonb NOT NULL DEFAULT '{}',
        created_at timestamptz NOT NULL DEFAULT now(),
        created_by uuid,
        CONSTRAINT fk_custom_relationship_data_relationship FOREIGN KEY (tenant_id, relationship_id)
            REFERENCES custom.custom_relationships (tenant_id, id) ON DELETE CASCADE,
        CONSTRAINT uq_custom_relationship_data_pair UNIQUE (relationship_id, from_record_id, to_record_id)
    )""",
    """CREATE INDEX ix_custom_relationship_data_from
       ON custom.custom_relationship_data (tenant_id, relationship_id, from_record_id)""",
    """CREATE INDEX ix_custom_relationship_data_to
       ON custom.custom_relationship_data (tenant_id, relationship_id, to_record_id)""",
    "CREATE INDEX ix_custom_relationship_data_records ON custom.custom_relationship_data (tenant_id, from_record_id)",
    "CREATE INDEX ix_custom_relationship_data_records_to ON custom.custom_relationship_data (tenant_id, to_record_id)",
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)
    for table in TABLES:
        for statement in rls_statements("custom", table):
            op.execute(statement)


def downgrade() -> None:
    for table in reversed(TABLES):
        op.execute(f"DROP TABLE IF EXISTS custom.{table} CASCADE")
    for function in ("field_text", "field_bigint", "field_numeric", "field_boolean", "field_date",
                     "field_timestamptz"):  # fmt: skip
        op.execute(f"DROP FUNCTION IF EXISTS custom.{function}(jsonb, text)")
    op.execute("DROP FUNCTION IF EXISTS custom.iso_date(text)")
