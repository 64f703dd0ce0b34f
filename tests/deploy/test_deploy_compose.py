"""The Compose suite: two shard servers, a directory and an audit server, NATS with JetStream
flushed to disk, every service, and the gateway as the only published port."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.deploy.deploy_support import COMPOSE_FILE, DEPLOY, GRPC_PORT, K8S, load_yaml_documents

pytestmark = pytest.mark.unit

NATS_MINIMUM = (2, 10, 23)


def _version(tag: str) -> tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", tag)
    assert match, f"NATS image tag {tag!r} names no exact version"
    return tuple(int(part) for part in match.groups())


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"pg-directory", "pg-audit", "pg-shard-0", "pg-shard-1", "nats"} <= set(services)
    assert {"tenant", "audit", "gateway"} <= set(services)
    for shard in ("shard-0", "shard-1"):
        for service in ("core-entity", "custom-object"):
            environment = services[f"{service}-{shard}"]["environment"]
            assert environment["CRM_SHARD_NAME"] == shard
            assert f"@pg-{shard}:5432/" in environment["CRM_DB_URL"]
            assert f"@pg-{shard}:5432/" in environment["CRM_DB_OWNER_URL"]


def test_services_connect_as_the_app_role_and_migrate_as_the_owner(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        environment = service.get("environment", {})
        if "CRM_DB_URL" in environment:
            assert environment["CRM_DB_URL"].startswith("postgresql://crm_app:"), name
            assert environment["CRM_DB_OWNER_URL"].startswith("postgresql://crm_owner:"), name


def test_init_script_creates_the_two_roles() -> None:
    script = (DEPLOY / "compose" / "postgres-init" / "10-crm-roles.sh").read_text()
    assert "CREATE ROLE crm_owner LOGIN NOSUPERUSER NOBYPASSRLS" in script
    assert "CREATE ROLE crm_app LOGIN NOSUPERUSER NOBYPASSRLS" in script
    assert "CREATE DATABASE crm OWNER crm_owner" in script


def test_only_the_gateway_publishes_a_port(compose: dict[str, Any]) -> None:
    published = {name for name, service in compose["services"].items() if service.get("ports")}
    assert published == {"gateway"}
    (port,) = compose["services"]["gateway"]["ports"]
    assert port.endswith(f":{GRPC_PORT}:{GRPC_PORT}")


def test_tenant_bootstraps_both_shards(compose: dict[str, Any]) -> None:
    shards = json.loads(compose["services"]["tenant"]["environment"]["CRM_BOOTSTRAP_SHARDS"])
    assert [s["name"] for s in shards] == ["shard-0", "shard-1"]
    for shard in shards:
        assert shard["core_entity_address"] == f"core-entity-{shard['name']}:{GRPC_PORT}"
        assert shard["custom_object_address"] == f"custom-object-{shard['name']}:{GRPC_PORT}"
        assert shard["core_entity_address"].split(":")[0] in compose["services"]


def test_gateway_waits_for_healthy_backends(compose: dict[str, Any]) -> None:
    depends = compose["services"]["gateway"]["depends_on"]
    backends = {n for n, s in compose["services"].items() if "build" in s and n != "gateway"}
    assert set(depends) == backends
    assert all(condition == {"condition": "service_healthy"} for condition in depends.values())


def test_postgres_18_volumes_mount_the_parent_directory(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name.startswith("pg-"):
            assert service["image"].startswith("postgres:18")
            assert any(v.endswith(":/var/lib/postgresql") for v in service["volumes"]), name


def test_nats_flushes_every_write_and_is_recent(compose: dict[str, Any]) -> None:
    nats = compose["services"]["nats"]
    assert _version(nats["image"].split(":", 1)[1]) >= NATS_MINIMUM
    conf = (COMPOSE_FILE.parent / "nats.conf").read_text()
    assert re.search(r"jetstream\s*\{[^}]*sync_interval:\s*always", conf)


@pytest.mark.parametrize("values", ["values.yaml", "values-dev.yaml"])
def test_nats_helm_values(values: str) -> None:
    (document,) = load_yaml_documents(K8S / "nats" / values)
    assert _version(document["container"]["image"]["tag"]) >= NATS_MINIMUM
    jetstream = document["config"]["jetstream"]
    assert jetstream["enabled"] is True and jetstream["fileStore"]["enabled"] is True
    assert jetstream["merge"]["sync_interval"] == "always"
    if values == "values.yaml":
        assert document["config"]["cluster"] == {"enabled": True, "replicas": 3}
