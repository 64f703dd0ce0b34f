"""Settings of the core-entity service: the shard settings plus what is its own."""

from __future__ import annotations

from pydantic import Field

from shared.config import ShardServiceSettings


class CoreEntitySettings(ShardServiceSettings):
    #: Hash partitions of core.activities; read by the migration that creates the table (a
    #: later change needs a repartitioning migration).
    activity_partitions: int = 4
    #: Days a soft-deleted record can be brought back with Undelete.
    undelete_retention_days: int = 30
    #: Seconds custom field definitions stay cached without a change event.
    custom_field_cache_seconds: float = 300.0
    #: Check the shard membership table (shard.tenants) on every call when it exists.
    shard_membership_check: bool = True
    #: Build the indexes of `is_indexed` and `is_unique` custom fields (as the schema owner,
    #: `db_owner_url`, in the background). Off: lists on custom fields read the tenant's rows.
    custom_field_indexes: bool = True
    #: Statement timeout of one index build, in seconds (a build reads the whole table).
    custom_field_index_timeout_seconds: float = 1800.0
    #: Days an import id is remembered: a retry within them creates nothing twice.
    import_retry_days: float = Field(default=7.0, gt=0)
    #: Seconds between runs that forget older imports' rows (`core.import_rows`); 0 disables.
    import_prune_interval_seconds: float = 24 * 3600.0

    @classmethod
    def from_shard(cls, settings: ShardServiceSettings) -> CoreEntitySettings:
        """The shard settings plus this service's own variables from the environment."""
        if isinstance(settings, cls):
            return settings
        return cls(**dict(settings))
