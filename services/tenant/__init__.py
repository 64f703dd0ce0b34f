"""Tenant service: tenants, users, API keys, configuration and the shard directory."""

SERVICE = "tenant"
SCHEMA = "tenant"
