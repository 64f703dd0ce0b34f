"""Core entities: accounts, contacts, leads, pipelines and their stages, deals, activities
(hash-partitioned by tenant), the tenant's supported currencies and import bookkeeping.

Follows the seed's data model with its fixes:
- every key between tenant tables is composite (tenant_id, id), so a reference can never cross
  tenants, and the seed's cross-entity CHECKs with sub-queries (not valid PostgreSQL) become
  such keys: a deal's stage is keyed by (tenant_id, pipeline_id, stage_id), so the stage must
  belong to the deal's pipeline;
- ON DELETE SET NULL names its column (PostgreSQL 15+), or it would null tenant_id too;
- "one default pipeline per tenant" is a partial unique index: the seed's
  UNIQUE (tenant_id, is_default) would also forbid a second non-default pipeline;
- the seed's overdue index predicate used now(), which an index may not; the predicate keeps
  the status test and queries add `due_date < now()`;
- every row carries version (the etag), created/updated at/by and deleted_at (soft delete);
  unique indexes ignore soft-deleted rows; the seed's single-column foreign-key indexes lead
  with tenant_id, because every query and every composite key does.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import os

from alembic import op

from shared.db import rls_statements

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Hash partitions of core.activities; read once when the table is created (changing it later
# needs a repartitioning migration). CRM_ACTIVITY_PARTITIONS is the same variable the service's
# settings read.
DEFAULT_ACTIVITY_PARTITIONS = 4

EMAIL_RE = r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$"
# Digits with an optional leading +, spaces, dots, dashes, parentheses and an extension.
PHONE_RE = r"^\+?[0-9(][0-9 ().-]{3,28}[0-9]( *(x|ext\.?) *[0-9]{1,6})?$"
URL_RE = r"^https?://[^\s/?#]+\.[^\s/?#]+([/?#]\S*)?$"

AUDIT_COLUMNS = """
        version bigint NOT NULL DEFAULT 1,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        created_by uuid NOT NULL,
        updated_by uuid NOT NULL,
        deleted_at timestamptz"""


def _partitions() -> int:
    raw = os.environ.get("CRM_ACTIVITY_PARTITIONS", "")
    count = int(raw) if raw.strip() else DEFAULT_ACTIVITY_PARTITIONS
    if not 1 <= count <= 256:
        raise ValueError("CRM_ACTIVITY_PARTITIONS must be between 1 and 256")
    return count


def statements(partitions: int) -> list[str]:
    tables = [
        f"""CREATE TABLE core.accounts (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL,
        name varchar(255) NOT NULL,
        account_type varchar(50) NOT NULL DEFAULT 'prospect',
        industry varchar(100),
        website varchar(255),
        phone varchar(50),
        billing_address jsonb,
        shipping_address jsonb,
        parent_account_id uuid,
        annual_revenue numeric(15,2),
        employee_count integer,
        description text,
        custom_fields jsonb NOT NULL DEFAULT '{{}}',{AUDIT_COLUMNS},
        CONSTRAINT uq_accounts_tenant_id UNIQUE (tenant_id, id),
        CONSTRAINT fk_accounts_parent FOREIGN KEY (tenant_id, parent_account_id)
            REFERENCES core.accounts (tenant_id, id) ON DELETE SET NULL (parent_account_id),
        CONSTRAINT ck_accounts_name_not_blank CHECK (btrim(name) <> ''),
        CONSTRAINT valid_account_type CHECK (account_type IN ('prospect', 'customer', 'partner', 'competitor')),
        CONSTRAINT valid_employee_count CHECK (employee_count >= 0),
        CONSTRAINT valid_annual_revenue CHECK (annual_revenue >= 0),
        CONSTRAINT valid_website CHECK (website IS NULL OR website ~* '{URL_RE}'),
        CONSTRAINT valid_phone CHECK (phone IS NULL OR phone ~* '{PHONE_RE}'),
        CONSTRAINT ck_accounts_not_own_parent CHECK (parent_account_id IS DISTINCT FROM id)
    )""",
        "CREATE INDEX idx_accounts_tenant_id ON core.accounts (tenant_id)",
        "CREATE INDEX idx_accounts_name ON core.accounts (tenant_id, name)",
        "CREATE INDEX idx_accounts_type ON core.accounts (tenant_id, account_type)",
        "CREATE INDEX idx_accounts_parent ON core.accounts (tenant_id, parent_account_id)",
        "CREATE INDEX idx_accounts_created_at ON core.accounts (tenant_id, created_at)",
        f"""CREATE TABLE core.contacts (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL,
        account_id uuid,
        first_name varchar(100) NOT NULL,
        last_name varchar(100) NOT NULL,
        email varchar(255),
        phone varchar(50),
        mobile varchar(50),
        title varchar(100),
        department varchar(100),
        mailing_address jsonb,
        lead_source varchar(100),
        contact_status varchar(50) NOT NULL DEFAULT 'active',
        do_not_call boolean NOT NULL DEFAULT false,
        do_not_email boolean NOT NULL DEFAULT false,
        email_opt_out boolean NOT NULL DEFAULT false,
        description text,
        custom_fields jsonb NOT NULL DEFAULT '{{}}',{AUDIT_COLUMNS},
        CONSTRAINT uq_contacts_tenant_id UNIQUE (tenant_id, id),
        CONSTRAINT fk_contact_account_tenant FOREIGN KEY (tenant_id, account_id)
            REFERENCES core.accounts (tenant_id, id) ON DELETE SET NULL (account_id),
        CONSTRAINT valid_contact_status CHECK (contact_status IN ('active', 'inactive', 'deceased')),
        CONSTRAINT valid_email CHECK (email IS NULL OR email ~ '{EMAIL_RE}'),
        CONSTRAINT valid_phone CHECK (phone IS NULL OR phone ~* '{PHONE_RE}'),
        CONSTRAINT valid_mobile CHECK (mobile IS NULL OR mobile ~* '{PHONE_RE}'),
        CONSTRAINT contact_name_not_empty CHECK (btrim(first_name) <> '' AND btrim(last_name) <> '')
    )""",
        # Case-insensitive, and a soft-deleted contact does not hold its address.
        "CREATE UNIQUE INDEX idx_contacts_email_tenant ON core.contacts (tenant_id, lower(email)) "
        "WHERE email IS NOT NULL AND deleted_at IS NULL",
        "CREATE INDEX idx_contacts_tenant_id ON core.contacts (tenant_id)",
        "CREATE INDEX idx_contacts_account_id ON core.contacts (tenant_id, account_id)",
        "CREATE INDEX idx_contacts_name ON core.contacts (tenant_id, last_name, first_name)",
        "CREATE INDEX idx_contacts_status ON core.contacts (tenant_id, contact_status)",
        "CREATE INDEX idx_contacts_created_at ON core.contacts (tenant_id, created_at)",
        "CREATE INDEX idx_contacts_email ON core.contacts (tenant_id, email) WHERE email IS NOT NULL",
        "CREATE INDEX idx_contacts_account_status ON core.contacts (tenant_id, account_id, contact_status) "
        "WHERE contact_status = 'active'",
        f"""CREATE TABLE core.leads (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL,
        first_name varchar(100) NOT NULL,
        last_name varchar(100) NOT NULL,
        email varchar(255),
        phone varchar(50),
        company varchar(255),
        title varchar(100),
        lead_source varchar(100),
        lead_status varchar(50) NOT NULL DEFAULT 'new',
        lead_score integer NOT NULL DEFAULT 0,
        rating varchar(20),
        industry varchar(100),
        annual_revenue numeric(15,2),
        employee_count integer,
        website varchar(255),
        mailing_address jsonb,
        description text,
        converted boolean NOT NULL DEFAULT false,
        converted_date timestamptz,
        converted_contact_id uuid,
        converted_account_id uuid,
        converted_deal_id uuid,
        custom_fields jsonb NOT NULL DEFAULT '{{}}',{AUDIT_COLUMNS},
        CONSTRAINT uq_leads_tenant_id UNIQUE (tenant_id, id),
        CONSTRAINT fk_leads_converted_contact FOREIGN KEY (tenant_id, converted_contact_id)
            REFERENCES core.contacts (tenant_id, id) ON DELETE SET NULL (converted_contact_id),
        CONSTRAINT fk_leads_converted_account FOREIGN KEY (tenant_id, converted_account_id)
            REFERENCES core.accounts (tenant_id, id) ON DELETE SET NULL (converted_account_id),
        CONSTRAINT ck_leads_names_not_blank CHECK (btrim(first_name) <> '' AND btrim(last_name) <> ''),
        CONSTRAINT valid_lead_status CHECK (lead_status IN ('new', 'contacted', 'qualified', 'unqualified', 'converted')),
        CONSTRAINT valid_rating CHECK (rating IS NULL OR rating IN ('hot', 'warm', 'cold')),
        CONSTRAINT valid_lead_score CHECK (lead_score >= 0 AND lead_score <= 100),
        CONSTRAINT valid_email CHECK (email IS NULL OR email ~ '{EMAIL_RE}'),
        CONSTRAINT valid_phone CHECK (phone IS NULL OR phone ~* '{PHONE_RE}'),
        CONSTRAINT valid_website CHECK (website IS NULL OR website ~* '{URL_RE}'),
        CONSTRAINT valid_annual_revenue CHECK (annual_revenue >= 0),
        CONSTRAINT valid_employee_count CHECK (employee_count >= 0),
        CONSTRAINT conversion_consistency CHECK (
            (converted = false AND converted_date IS NULL AND converted_contact_id IS NULL
                AND converted_account_id IS NULL AND converted_deal_id IS NULL) OR
            (converted = true AND converted_date IS NOT NULL)
        ),
        CONSTRAINT ck_leads_converted_status CHECK ((lead_status = 'converted') = converted)
    )""",
        "CREATE INDEX idx_leads_tenant_id ON core.leads (tenant_id)",
        "CREATE INDEX idx_leads_email ON core.leads (tenant_id, email) WHERE email IS NOT NULL",
        "CREATE INDEX idx_leads_status ON core.leads (tenant_id, lead_status)",
        "CREATE INDEX idx_leads_score ON core.leads (tenant_id, lead_score DESC)",
        "CREATE INDEX idx_leads_converted ON core.leads (tenant_id, converted)",
        "CREATE INDEX idx_leads_created_at ON core.leads (tenant_id, created_at)",
        "CREATE INDEX idx_leads_score_status ON core.leads (tenant_id, lead_score DESC, lead_status) "
        "WHERE converted = false",
        f"""CREATE TABLE core.pipelines (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL,
        name varchar(255) NOT NULL,
        description text,
        is_default boolean NOT NULL DEFAULT false,
        is_active boolean NOT NULL DEFAULT true,{AUDIT_COLUMNS},
        CONSTRAINT uq_pipelines_tenant_id UNIQUE (tenant_id, id),
        CONSTRAINT ck_pipelines_name_not_blank CHECK (btrim(name) <> '')
    )""",
        "CREATE UNIQUE INDEX unique_default_pipeline_per_tenant ON core.pipelines (tenant_id) "
        "WHERE is_default AND deleted_at IS NULL",
        "CREATE INDEX idx_pipelines_tenant_id ON core.pipelines (tenant_id, created_at)",
        # Stages live and die with their pipeline (no soft delete of their own).
        """CREATE TABLE core.pipeline_stages (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL,
        pipeline_id uuid NOT NULL,
        name varchar(255) NOT NULL,
        stage_order integer NOT NULL,
        probability numeric(5,2) NOT NULL DEFAULT 0,
        is_closed boolean NOT NULL DEFAULT false,
        is_won boolean NOT NULL DEFAULT false,
        version bigint NOT NULL DEFAULT 1,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        created_by uuid NOT NULL,
        updated_by uuid NOT NULL,
        CONSTRAINT uq_pipeline_stages_tenant_id UNIQUE (tenant_id, id),
        CONSTRAINT uq_pipeline_stages_pipeline_id UNIQUE (tenant_id, pipeline_id, id),
        CONSTRAINT fk_pipeline_stages_pipeline FOREIGN KEY (tenant_id, pipeline_id)
            REFERENCES core.pipelines (tenant_id, id) ON DELETE CASCADE,
        CONSTRAINT ck_pipeline_stages_name_not_blank CHECK (btrim(name) <> ''),
        CONSTRAINT ck_pipeline_stages_order CHECK (stage_order >= 0),
        CONSTRAINT valid_probability CHECK (probability >= 0 AND probability <= 100),
        CONSTRAINT valid_closed_won CHECK (NOT is_won OR is_closed),
        -- Deferred, so a reorder can swap positions inside one transaction.
        CONSTRAINT unique_stage_order_per_pipeline UNIQUE (pipeline_id, stage_order) DEFERRABLE INITIALLY DEFERRED,
        CONSTRAINT unique_stage_name_per_pipeline UNIQUE (pipeline_id, name) DEFERRABLE INITIALLY DEFERRED
    )""",
        f"""CREATE TABLE core.deals (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL,
        account_id uuid,
        contact_id uuid,
        pipeline_id uuid NOT NULL,
        stage_id uuid NOT NULL,
        name varchar(255) NOT NULL,
        amount numeric(15,2),
        currency varchar(3) NOT NULL DEFAULT 'USD',
        probability numeric(5,2),
        expected_close_date date,
        actual_close_date date,
        deal_type varchar(50),
        lead_source varchar(100),
        next_step text,
        description text,
        is_closed boolean NOT NULL DEFAULT false,
        is_won boolean NOT NULL DEFAULT false,
        custom_fields jsonb NOT NULL DEFAULT '{{}}',{AUDIT_COLUMNS},
        CONSTRAINT uq_deals_tenant_id UNIQUE (tenant_id, id),
        CONSTRAINT fk_deal_account_tenant FOREIGN KEY (tenant_id, account_id)
            REFERENCES core.accounts (tenant_id, id) ON DELETE SET NULL (account_id),
        CONSTRAINT fk_deal_contact_tenant FOREIGN KEY (tenant_id, contact_id)
            REFERENCES core.contacts (tenant_id, id) ON DELETE SET NULL (contact_id),
        CONSTRAINT fk_deal_pipeline FOREIGN KEY (tenant_id, pipeline_id)
            REFERENCES core.pipelines (tenant_id, id),
        -- The seed's fk_deal_stage_pipeline CHECK: the stage must be one of the deal's pipeline.
        CONSTRAINT fk_deal_stage_pipeline FOREIGN KEY (tenant_id, pipeline_id, stage_id)
            REFERENCES core.pipeline_stages (tenant_id, pipeline_id, id),
        CONSTRAINT ck_deals_name_not_blank CHECK (btrim(name) <> ''),
        CONSTRAINT valid_amount CHECK (amount IS NULL OR amount >= 0),
        CONSTRAINT valid_probability CHECK (probability IS NULL OR (probability >= 0 AND probability <= 100)),
        CONSTRAINT valid_currency CHECK (currency ~ '^[A-Z]{{3}}$'),
        CONSTRAINT valid_deal_type CHECK (deal_type IS NULL OR deal_type IN ('new_business', 'existing_business', 'renewal')),
        CONSTRAINT valid_closed_won CHECK (NOT is_won OR is_closed),
        CONSTRAINT close_date_consistency CHECK (NOT is_closed OR actual_close_date IS NOT NULL)
    )""",
        "CREATE INDEX idx_deals_tenant_id ON core.deals (tenant_id)",
        "CREATE INDEX idx_deals_account_id ON core.deals (tenant_id, account_id)",
        "CREATE INDEX idx_deals_contact_id ON core.deals (tenant_id, contact_id)",
        "CREATE INDEX idx_deals_pipeline_stage ON core.deals (tenant_id, pipeline_id, stage_id)",
        "CREATE INDEX idx_deals_amount ON core.deals (tenant_id, amount DESC) WHERE amount IS NOT NULL",
        "CREATE INDEX idx_deals_close_date ON core.deals (tenant_id, expected_close_date) "
        "WHERE expected_close_date IS NOT NULL",
        "CREATE INDEX idx_deals_status ON core.deals (tenant_id, is_closed, is_won)",
        "CREATE INDEX idx_deals_created_at ON core.deals (tenant_id, created_at)",
        "CREATE INDEX idx_deals_account_open ON core.deals (tenant_id, account_id, is_closed) WHERE is_closed = false",
        "CREATE INDEX idx_deals_open_amount ON core.deals (tenant_id, amount DESC) "
        "WHERE is_closed = false AND amount IS NOT NULL",
        """ALTER TABLE core.leads ADD CONSTRAINT fk_leads_converted_deal FOREIGN KEY (tenant_id, converted_deal_id)
            REFERENCES core.deals (tenant_id, id) ON DELETE SET NULL (converted_deal_id)""",
        # Hash-partitioned by tenant: the primary key must hold the partition key.
        f"""CREATE TABLE core.activities (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL,
        account_id uuid,
        contact_id uuid,
        lead_id uuid,
        deal_id uuid,
        activity_type varchar(50) NOT NULL,
        subject varchar(255) NOT NULL,
        description text,
        status varchar(20) NOT NULL DEFAULT 'planned',
        priority varchar(20) NOT NULL DEFAULT 'medium',
        due_date timestamptz,
        completed_date timestamptz,
        duration_minutes integer,
        location varchar(255),
        is_all_day boolean NOT NULL DEFAULT false,
        reminder_minutes integer,
        custom_fields jsonb NOT NULL DEFAULT '{{}}',{AUDIT_COLUMNS},
        assigned_to uuid NOT NULL,
        CONSTRAINT pk_activities PRIMARY KEY (tenant_id, id),
        CONSTRAINT fk_activities_account FOREIGN KEY (tenant_id, account_id)
            REFERENCES core.accounts (tenant_id, id) ON DELETE CASCADE,
        CONSTRAINT fk_activities_contact FOREIGN KEY (tenant_id, contact_id)
            REFERENCES core.contacts (tenant_id, id) ON DELETE CASCADE,
        CONSTRAINT fk_activities_lead FOREIGN KEY (tenant_id, lead_id)
            REFERENCES core.leads (tenant_id, id) ON DELETE CASCADE,
        CONSTRAINT fk_activities_deal FOREIGN KEY (tenant_id, deal_id)
            REFERENCES core.deals (tenant_id, id) ON DELETE CASCADE,
        CONSTRAINT ck_activities_subject_not_blank CHECK (btrim(subject) <> ''),
        CONSTRAINT valid_activity_type CHECK (activity_type IN ('call', 'email', 'meeting', 'task', 'note', 'demo')),
        CONSTRAINT valid_status CHECK (status IN ('planned', 'in_progress', 'completed', 'cancelled', 'deferred')),
        CONSTRAINT valid_priority CHECK (priority IN ('low', 'medium', 'high', 'urgent')),
        CONSTRAINT valid_duration CHECK (duration_minutes IS NULL OR duration_minutes > 0),
        CONSTRAINT valid_reminder CHECK (reminder_minutes IS NULL OR reminder_minutes >= 0),
        CONSTRAINT completion_consistency CHECK (
            (status <> 'completed' AND completed_date IS NULL) OR
            (status = 'completed' AND completed_date IS NOT NULL)
        ),
        CONSTRAINT at_least_one_relation CHECK (
            account_id IS NOT NULL OR contact_id IS NOT NULL OR lead_id IS NOT NULL OR deal_id IS NOT NULL
        )
    ) PARTITION BY HASH (tenant_id)""",
        *(
            f"CREATE TABLE core.activities_p{i} PARTITION OF core.activities "
            f"FOR VALUES WITH (MODULUS {partitions}, REMAINDER {i})"
            for i in range(partitions)
        ),
        "CREATE INDEX idx_activities_tenant_id ON core.activities (tenant_id)",
        "CREATE INDEX idx_activities_account_id ON core.activities (tenant_id, account_id)",
        "CREATE INDEX idx_activities_contact_id ON core.activities (tenant_id, contact_id)",
        "CREATE INDEX idx_activities_lead_id ON core.activities (tenant_id, lead_id)",
        "CREATE INDEX idx_activities_deal_id ON core.activities (tenant_id, deal_id)",
        "CREATE INDEX idx_activities_assigned_to ON core.activities (tenant_id, assigned_to)",
        "CREATE INDEX idx_activities_due_date ON core.activities (tenant_id, due_date) WHERE due_date IS NOT NULL",
        "CREATE INDEX idx_activities_status ON core.activities (tenant_id, status)",
        "CREATE INDEX idx_activities_type ON core.activities (tenant_id, activity_type)",
        "CREATE INDEX idx_activities_created_at ON core.activities (tenant_id, created_at)",
        "CREATE INDEX idx_activities_assigned_due ON core.activities (tenant_id, assigned_to, due_date) "
        "WHERE status IN ('planned', 'in_progress')",
        "CREATE INDEX idx_activities_overdue ON core.activities (tenant_id, due_date) "
        "WHERE status IN ('planned', 'in_progress') AND due_date IS NOT NULL",
        # The currencies a tenant's deals may use; none means the service default (USD).
        """CREATE TABLE core.tenant_currencies (
        tenant_id uuid NOT NULL,
        currency_code varchar(3) NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT pk_tenant_currencies PRIMARY KEY (tenant_id, currency_code),
        CONSTRAINT ck_tenant_currencies_code CHECK (currency_code ~ '^[A-Z]{3}$')
    )""",
        # Which rows of an import have landed, so a retried import skips them.
        """CREATE TABLE core.import_rows (
        tenant_id uuid NOT NULL,
        import_id uuid NOT NULL,
        row_index bigint NOT NULL,
        entity_type varchar(20) NOT NULL,
        record_id uuid NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT pk_import_rows PRIMARY KEY (tenant_id, import_id, row_index)
    )""",
    ]
    rls_tables = [
        "accounts",
        "contacts",
        "leads",
        "pipelines",
        "pipeline_stages",
        "deals",
        "activities",
        *(f"activities_p{i}" for i in range(partitions)),
        "tenant_currencies",
        "import_rows",
    ]
    return [*tables, *(s for table in rls_tables for s in rls_statements("core", table))]


def upgrade() -> None:
    for statement in statements(_partitions()):
        op.execute(statement)


def downgrade() -> None:
    for table in (
        "import_rows",
        "tenant_currencies",
        "activities",
        "deals",
        "pipeline_stages",
        "pipelines",
        "leads",
        "contacts",
        "accounts",
    ):
        op.execute(f"DROP TABLE IF EXISTS core.{table} CASCADE")
