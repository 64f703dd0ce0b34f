"""The local stack behind `crm up`: backends (embedded or existing), databases and roles, then
each service and the gateway as its own process, started with the same `crm serve <service>`
command the container images run."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from cryptography.fernet import Fernet

from cli.embedded import EmbeddedNats, EmbeddedPostgres, free_port, new_secret, port_is_free
from shared.healthcheck import check
from shared.provisioning import Roles, dsn_for, ensure_database, ensure_roles, trust_field_readers

SERVICE_ORDER = ("tenant", "audit", "core-entity", "custom-object", "gateway")


def crm_command() -> list[str]:
    beside_python = Path(sys.executable).parent / "crm"
    return [str(beside_python)] if beside_python.exists() else [sys.executable, "-m", "cli.main"]


@dataclass
class ServiceProcess:
    name: str  # e.g. "core-entity@shard-0"
    kind: str  # the `crm serve` argument
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [*crm_command(), "serve", self.kind],
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def healthy(self) -> bool:
        return check(self.address, timeout=0.5)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@dataclass
class Stack:
    """A whole suite on this machine. `database_url` / `nats_url` switch to existing servers."""

    home: Path
    database_url: str | None = None
    nats_url: str | None = None
    shards: int = 2
    prefix: str = "crm"
    log_level: str = "info"
    gateway_port: int | None = None
    #: OTLP/gRPC endpoint every process exports traces to; empty: no export.
    otlp_endpoint: str = ""
    state: dict[str, Any] = field(default_factory=dict)
    postgres: EmbeddedPostgres | None = None
    nats: EmbeddedNats | None = None
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    @property
    def state_file(self) -> Path:
        return self.home / "stack.json"

    def _load_state(self) -> None:
        if self.state_file.exists():
            self.state = json.loads(self.state_file.read_text())
        defaults = {
            "pg_password": new_secret(),
            "owner_password": new_secret(),
            "app_password": new_secret(),
            "internal_token": new_secret(),
            "platform_admin_key": "crm_platform_" + new_secret(),
            "encryption_key": Fernet.generate_key().decode(),
        }
        for key, value in defaults.items():
            self.state.setdefault(key, value)

    def _save_state(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(self.state, indent=2))
        self.state_file.chmod(0o600)

    def _port(self, key: str) -> int:
        """Reuses the port of the last run when it is free, so addresses stay stable."""
        port = self.state.get(key)
        if not isinstance(port, int) or not port_is_free(port):
            port = free_port()
        self.state[key] = port
        return port

    @property
    def roles(self) -> Roles:
        return Roles(
            owner=f"{self.prefix}_owner",
            owner_password=self.state["owner_password"],
            app=f"{self.prefix}_app",
            app_password=self.state["app_password"],
        )

    @property
    def admin_dsn(self) -> str:
        if self.database_url:
            return self.database_url
        assert self.postgres is not None
        return self.postgres.admin_dsn

    @property
    def event_url(self) -> str:
        if self.nats_url:
            return self.nats_url
        assert self.nats is not None
        return self.nats.url

    @property
    def internal_token(self) -> str:
        return str(self.state["internal_token"])

    @property
    def platform_admin_key(self) -> str:
        return str(self.state["platform_admin_key"])

    @property
    def gateway_address(self) -> str:
        return self.services["gateway"].address

    def database(self, role: str) -> str:
        return f"{self.prefix}_{role}"

    def db_urls(self, database: str) -> dict[str, str]:
        roles = self.roles
        return {
            "CRM_DB_URL": dsn_for(self.admin_dsn, database, roles.app, roles.app_password),
            "CRM_DB_OWNER_URL": dsn_for(self.admin_dsn, database, roles.owner, roles.owner_password),
        }

    # --- lifecycle ---------------------------------------------------------------------------

    def start_backends(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self._load_state()
        if not self.database_url:
            self.postgres = EmbeddedPostgres(
                self.home / "postgres", self._port("pg_port"), self.state["pg_password"]
            )
            self.postgres.start()
        if not self.nats_url:
            self.nats = EmbeddedNats(self.home / "nats", self._port("nats_port"))
            self.nats.start()
        self._save_state()
        asyncio.run(self._provision())

    async def _provision(self) -> None:
        await ensure_roles(self.admin_dsn, self.roles)
        names = ["directory", "audit", *(f"shard_{i}" for i in range(self.shards))]
        for name in names:
            await ensure_database(self.admin_dsn, self.database(name), self.roles)

    def plan_services(self) -> None:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        common = {
            "CRM_LISTEN_HOST": "127.0.0.1",
            "CRM_NATS_URL": self.event_url,
            "CRM_INTERNAL_TOKEN": self.internal_token,
            "CRM_LOG_LEVEL": self.log_level,
            "CRM_SHUTDOWN_GRACE_SECONDS": "2",
            "CRM_OTLP_ENDPOINT": self.otlp_endpoint,
        }

        def add(name: str, kind: str, env: dict[str, str], port: int | None = None) -> ServiceProcess:
            chosen = port if port is not None else self._port(f"port:{name}")
            self.state[f"port:{name}"] = chosen
            metrics = {"CRM_PORT": str(chosen), "CRM_METRICS_PORT": str(self._port(f"metrics:{name}"))}
            service = ServiceProcess(name, kind, chosen, {**common, **env, **metrics}, logs / f"{name}.log")
            self.services[name] = service
            return service

        shard_specs = []
        for i in range(self.shards):
            shard = f"shard-{i}"
            urls = self.db_urls(self.database(f"shard_{i}"))
            core_port = self._port(f"port:core-entity@{shard}")
            custom_port = self._port(f"port:custom-object@{shard}")
            siblings = {
                **urls,
                "CRM_SHARD_NAME": shard,
                "CRM_CORE_ENTITY_ADDRESS": f"127.0.0.1:{core_port}",
                "CRM_CUSTOM_OBJECT_ADDRESS": f"127.0.0.1:{custom_port}",
            }
            core = add(f"core-entity@{shard}", "core-entity", siblings, port=core_port)
            custom = add(f"custom-object@{shard}", "custom-object", siblings, port=custom_port)
            shard_specs.append(
                {
                    "name": shard,
                    "core_entity_address": core.address,
                    "custom_object_address": custom.address,
                    # The tenant service keeps each shard's membership table and moves tenants
                    # between shard databases, so it needs both connections.
                    "dsn": urls["CRM_DB_URL"],
                    "owner_dsn": urls["CRM_DB_OWNER_URL"],
                }
            )
        tenant = add(
            "tenant",
            "tenant",
            {
                **self.db_urls(self.database("directory")),
                "CRM_BOOTSTRAP_SHARDS": json.dumps(shard_specs),
                # Encrypts secret configuration values and shard URLs at rest.
                "CRM_ENCRYPTION_KEY": self.state["encryption_key"],
            },
        )
        # One durable consumer per suite: suites sharing a NATS server must not take each
        # other's events.
        audit = add(
            "audit",
            "audit",
            {
                **self.db_urls(self.database("audit")),
                "CRM_CONSUMER_NAME": f"{self.prefix}_audit",
                # On a NATS of its own the stream starts empty; on a shared one, a new suite must
                # not replay other suites' history. Its consumers exist before any client call.
                "CRM_CONSUMER_DELIVER_FROM": "new" if self.nats_url else "all",
                # Restore, retention and erasure reach the owning services through the directory.
                "CRM_TENANT_ADDRESS": tenant.address,
            },
        )
        add(
            "gateway",
            "gateway",
            {
                "CRM_TENANT_ADDRESS": tenant.address,
                "CRM_AUDIT_ADDRESS": audit.address,
                "CRM_PLATFORM_ADMIN_KEY": self.platform_admin_key,
            },
            port=self.gateway_port if self.gateway_port else self._port("port:gateway"),
        )
        self._save_state()

    def start_services(self, timeout: float = 90) -> None:
        for service in self.services.values():
            service.start()
        self.wait_healthy(list(self.services), timeout)
        self.state["pids"] = {name: s.process.pid for name, s in self.services.items() if s.process}
        if self.nats is not None and self.nats.process is not None:
            self.state["nats_pid"] = self.nats.process.pid
        self._save_state()

    def wait_healthy(self, names: list[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                service = self.services[name]
                if service.process is not None and service.process.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {service.process.returncode}; see {service.log_path}"
                    )
                if service.healthy():
                    pending.discard(name)
            time.sleep(0.1)
        if pending:
            raise TimeoutError(
                f"not healthy after {timeout}s: {sorted(pending)} (logs in {self.home / 'logs'})"
            )

    def start(self) -> None:
        self.start_backends()
        self.plan_services()
        try:
            self.start_services()
            asyncio.run(self.trust_field_readers())
        except BaseException:
            self.stop()
            raise

    async def trust_field_readers(self) -> None:
        """As the server's admin, once the services have migrated: filters on custom fields may
        then use their indexes under row-level security (docs/custom-objects.md)."""
        readers = field_reader_functions()
        for i in range(self.shards):
            try:
                await trust_field_readers(self.admin_dsn, self.database(f"shard_{i}"), readers)
            except asyncpg.InsufficientPrivilegeError:
                # An existing server administered by a non-superuser: filters still work, they
                # just read the tenant's rows instead of the index.
                return

    def restart_service(self, name: str, sig: int = signal.SIGTERM) -> None:
        service = self.services[name]
        service.stop(sig)
        service.start()
        self.wait_healthy([name])

    def stop(self) -> None:
        # The gateway first, so no new calls arrive while the backends drain.
        for name in sorted(self.services, key=lambda n: n != "gateway"):
            self.services[name].stop()
        if self.nats is not None:
            self.nats.stop()
        if self.postgres is not None:
            self.postgres.stop()
        for key in ("pids", "nats_pid", "up_pid"):
            self.state.pop(key, None)
        if self.state:
            self._save_state()


def field_reader_functions() -> list[str]:
    """Both shard services' typed custom-field readers, as `schema.name`."""
    from services.core_entity.adapters.indexes import READER_FUNCTIONS as CORE_READERS
    from services.custom_object.adapters.indexes import READER_FUNCTIONS as CUSTOM_READERS

    return [f"core.{name}" for name in CORE_READERS] + [f"custom.{name}" for name in CUSTOM_READERS]


def stop_recorded(home: Path, timeout: float = 30) -> list[str]:
    """`crm down` from another terminal. A foreground `crm up` is asked to stop (it stops its
    children cleanly); after `crm up --detach` the recorded processes are stopped one by one."""
    state_file = home / "stack.json"
    if not state_file.exists():
        return []
    state = json.loads(state_file.read_text())
    up_pid = state.get("up_pid")
    if isinstance(up_pid, int) and _signal(up_pid, signal.SIGTERM):
        _wait_gone(up_pid, timeout)
        return ["crm up"]
    stopped = [name for name, pid in (state.get("pids") or {}).items() if _signal(pid, signal.SIGTERM)]
    for pid in (state.get("pids") or {}).values():
        _wait_gone(pid, timeout)
    nats_pid = state.get("nats_pid")
    if isinstance(nats_pid, int) and _signal(nats_pid, signal.SIGTERM):
        _wait_gone(nats_pid, timeout)
        stopped.append("nats")
    if state.get("pg_port") and (home / "postgres" / "pgdata" / "postmaster.pid").exists():
        EmbeddedPostgres(home / "postgres", state["pg_port"], state["pg_password"]).stop()
        stopped.append("postgres")
    for key in ("pids", "nats_pid", "up_pid"):
        state.pop(key, None)
    state_file.write_text(json.dumps(state, indent=2))
    return stopped


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
