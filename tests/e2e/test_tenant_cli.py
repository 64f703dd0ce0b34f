"""`crm tenant|shard|user|apikey|config` against the running suite."""

from __future__ import annotations

import json

import grpc
import pytest
from typer.testing import CliRunner

from cli.main import app
from cli.stack import Stack
from tests.conftest import create_tenant

pytestmark = pytest.mark.e2e


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


async def test_the_tenant_commands_work_through_the_gateway(suite: Stack, gateway: grpc.aio.Channel) -> None:
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    platform = ["--gateway", suite.gateway_address, "--key", suite.platform_admin_key]
    own = ["--gateway", suite.gateway_address, "--key", tenant.api_key]

    assert tenant.tenant.id in run("tenant", "get", tenant.tenant.id, *platform)
    assert "shard-0" in run("shard", "list", *platform)
    suspended = json.loads(run("tenant", "suspend", tenant.tenant.id, *platform))
    assert suspended["status"] == "TENANT_STATUS_SUSPENDED"
    activated = json.loads(run("tenant", "activate", tenant.tenant.id, *platform))
    assert activated["status"] == "TENANT_STATUS_ACTIVE"

    run(
        "user",
        "create",
        "--email",
        "cli@example.com",
        "--password",
        "Sup3rSecret",
        "--role",
        "read_only",
        *own,
    )
    assert "cli@example.com" in run("user", "list", *own)
    created = run("apikey", "create", "--name", "cli", "--scope", "read", *own)
    assert "key (shown once): crm_" in created
    set_reply = json.loads(
        run("config", "set", "ui_customization", "theme", '{"primary_color": "#000000"}', *own)
    )
    assert set_reply["value"] == {"primary_color": "#000000"}
    assert "#000000" in run("config", "get", "ui_customization", "theme", *own)


def test_bad_cli_input_is_refused_before_any_call() -> None:
    result = CliRunner().invoke(
        app,
        [
            "tenant",
            "create",
            "--name",
            "x",
            "--subdomain",
            "x-y",
            "--admin-email",
            "a@b.io",
            "--admin-password",
            "Sup3rSecret",
            "--plan",
            "gold",
            "--key",
            "k",
            "--gateway",
            "127.0.0.1:1",
        ],
    )
    assert result.exit_code != 0 and "--plan" in result.output
