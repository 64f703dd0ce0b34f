"""Alembic environment of the shard membership schema ("shard") that the tenant service keeps in
every shard database."""

from alembic import context

from shared.migrations import run_env

run_env(context)
