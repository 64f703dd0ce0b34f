"""Typed settings read once from the environment at start-up.

Every process reads its own variables with the `CRM_` prefix; a missing required variable
fails fast with pydantic's message naming it. Nothing here connects to anything.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """What every service and the gateway needs."""

    model_config = SettingsConfigDict(env_prefix="CRM_", extra="ignore")

    #: Address the gRPC server binds to.
    listen_host: str = "127.0.0.1"
    #: gRPC port; 0 picks a free one (tests).
    port: int = 0
    #: NATS server URL(s), comma separated.
    nats_url: str = "nats://127.0.0.1:4222"
    #: Shared secret the gateway sends to backends in `x-crm-internal-token`; backends refuse
    #: calls without it.
    internal_token: SecretStr
    #: Seconds in-flight calls get to finish on SIGTERM.
    shutdown_grace_seconds: float = 5.0
    #: Structured log level.
    log_level: str = "info"
    #: Emit JSON log lines (production) instead of coloured console lines.
    log_json: bool = False
    #: Port of the Prometheus metrics endpoint (/metrics); 0 turns it off.
    metrics_port: int = 0
    #: OTLP/gRPC endpoint (host:port) that receives traces; empty turns tracing export off.
    otlp_endpoint: str = ""
    #: Replicas of the CRM_EVENTS stream: 1 on a single node, 3 in a JetStream cluster.
    nats_stream_replicas: int = 1
    #: Largest message a server accepts, in bytes.
    max_message_bytes: int = 4 * 1024 * 1024


class DatabaseSettings(CommonSettings):
    """A service that owns a schema in a PostgreSQL database."""

    #: DSN of the application role: no superuser, no BYPASSRLS, owns no table.
    db_url: SecretStr
    #: DSN of the schema owner, used only to run migrations.
    db_owner_url: SecretStr
    #: Connections kept per process.
    db_pool_size: int = 10
    #: Apply this service's migrations before serving.
    migrate_on_start: bool = True
    #: Seconds between outbox relay polls when no notification arrives.
    outbox_poll_seconds: float = 0.5


class TenantSettings(DatabaseSettings):
    """The tenant service (directory database)."""

    #: Shards registered at start-up when absent, as a JSON list of
    #: {"name", "core_entity_address", "custom_object_address", "max_tenants"}.
    bootstrap_shards: str = "[]"
    #: Seconds the gateway may cache a resolved credential.
    credential_cache_seconds: int = 5
    #: Fernet key (urlsafe base64 of 32 bytes) that encrypts configuration values marked
    #: is_encrypted and shard connection settings at rest. When empty, a key is derived from the
    #: internal token (local stacks only; set it in production).
    encryption_key: SecretStr = SecretStr("")
    #: Lifetime of a session token from Authenticate, in seconds.
    session_ttl_seconds: int = 8 * 3600
    #: Failed sign-ins in a row that lock an account.
    lockout_threshold: int = 5
    #: How long a locked account stays locked, in seconds.
    lockout_seconds: int = 15 * 60
    #: Deadline of onboarding's call to the shard's pipeline service, in seconds.
    onboarding_call_seconds: float = 10.0
    #: Create the default "Sales Pipeline" on the tenant's shard during onboarding.
    onboarding_pipeline: bool = True


class AuditSettings(DatabaseSettings):
    """The audit service (audit database)."""

    #: Durable consumer name on the CRM_EVENTS stream.
    consumer_name: str = "audit"
    #: Events fetched and written per batch.
    ingest_batch_size: int = 256
    #: Where a durable consumer created for the first time starts: "all" (the whole stream,
    #: for production) or "new" (events published from then on; for test stacks that share a
    #: NATS with others). An existing durable always resumes where it stopped.
    consumer_deliver_from: Literal["all", "new"] = "all"
    #: host:port of the tenant service: its DirectoryService locates each tenant's shard, and
    #: its DataAdminService restores and erases the tenant service's own records. Empty turns
    #: restore, retention, erasure and report counts into UNAVAILABLE.
    tenant_address: str = ""
    #: Seconds between scheduled retention runs over every tenant's active policies; 0 disables.
    retention_interval_seconds: float = 24 * 3600
    #: Seconds between scheduled archive runs; 0 disables (the seed's cron job runs weekly).
    archive_interval_seconds: float = 7 * 24 * 3600
    #: Scheduled archiving moves monthly partitions older than this many days.
    archive_after_days: int = 365
    #: Deadline of each call to an owning service's DataAdminService, in seconds.
    owner_call_timeout_seconds: float = 30.0


class ShardServiceSettings(DatabaseSettings):
    """A per-shard backend: core-entity or custom-object."""

    #: The shard this instance serves (its name as registered in the directory).
    shard_name: str = Field(default="shard-0")
    #: host:port of the same shard's core-entity service (custom-object checks lookups to core
    #: records through it).
    core_entity_address: str = ""
    #: host:port of the same shard's custom-object service (core-entity reads custom field
    #: definitions from it).
    custom_object_address: str = ""


class GatewaySettings(CommonSettings):
    """The gateway: the only address external clients need."""

    #: host:port of the tenant service.
    tenant_address: str
    #: host:port of the audit service.
    audit_address: str
    #: The platform admin credential for platform-level calls (tenants, shards, system metadata).
    platform_admin_key: SecretStr
    #: Per-plan rate limits as JSON {"basic": [calls_per_second, burst], ...}; unset plans keep
    #: the defaults (basic 50/100, professional 200/400, enterprise 1000/2000).
    rate_limits: str = ""
    #: Calls of one tenant the backends work on at once while other tenants call too; more wait
    #: in the gateway, so a tenant flooding within its rate cannot fill the queues its
    #: neighbours' calls pass through.
    tenant_concurrency: int = Field(default=4, ge=1)
    #: Deadline applied when the client sets none, in seconds.
    default_deadline_seconds: float = 30.0
    #: PEM certificate for TLS on the external port; plaintext when unset.
    tls_cert_file: str = ""
    #: PEM private key for TLS on the external port.
    tls_key_file: str = ""
