"""Audit service: the audit log fed by every service's change events, and its queries."""

SERVICE = "audit"
SCHEMA = "audit"
