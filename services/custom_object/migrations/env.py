"""Alembic environment of the custom_object service (schema "custom")."""

from alembic import context

from shared.migrations import run_env

run_env(context)
