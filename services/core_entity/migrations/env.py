"""Alembic environment of the core_entity service (schema "core")."""

from alembic import context

from shared.migrations import run_env

run_env(context)
