"""Alembic environment of the tenant service (schema "tenant")."""

from alembic import context

from shared.migrations import run_env

run_env(context)
