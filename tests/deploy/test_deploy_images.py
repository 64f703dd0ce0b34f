"""The images: one Dockerfile stage per service whose command is `crm serve <service>` (what
`crm up` starts), on a slim pinned Python base, as a non-root user, with a gRPC health check."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.deploy_support import (
    DOCKERFILE,
    GRPC_PORT,
    METRICS_PORT,
    ROOT,
    SERVICES,
    Stage,
    exec_form,
    resolve,
)

pytestmark = pytest.mark.unit


def test_crm_console_script_is_the_entry_point() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["crm"] == "cli.main:app"


def test_image_services_are_the_cli_services() -> None:
    from typer.main import get_command

    from cli.main import ServiceName, app
    from cli.stack import SERVICE_ORDER

    assert {s.value for s in ServiceName} == set(SERVICES)
    assert set(SERVICE_ORDER) == set(SERVICES)
    commands = get_command(app).commands  # type: ignore[attr-defined]
    assert {"serve", "migrate", "up"} <= set(commands)


def test_crm_up_starts_each_service_with_the_image_command(
    stages: dict[str, Stage], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cli.stack

    started: list[list[str]] = []

    class RecordingPopen:
        def __init__(self, args: list[str], **kwargs: Any) -> None:
            started.append(list(args))
            kwargs["stdout"].close()

    monkeypatch.setattr(cli.stack.subprocess, "Popen", RecordingPopen)
    for service in SERVICES:
        process = cli.stack.ServiceProcess(
            name=service, kind=service, port=1, env={}, log_path=tmp_path / f"{service}.log"
        )
        process.start()
    assert len(started) == len(SERVICES)
    for service, argv in zip(SERVICES, started, strict=True):
        (cmd,) = stages[service].all("CMD")
        image_command = exec_form(cmd)
        # `crm up` runs the console script beside its interpreter, or `python -m cli.main`.
        if Path(argv[0]).name == "crm":
            assert ["crm", *argv[1:]] == image_command
        else:
            assert argv[1:3] == ["-m", "cli.main"] and ["crm", *argv[3:]] == image_command


def test_one_final_stage_per_service(stages: dict[str, Stage]) -> None:
    final = {name for name, stage in stages.items() if stage.all("CMD")}
    assert final == set(SERVICES)


@pytest.mark.parametrize("service", SERVICES)
def test_image_command_is_crm_serve(service: str, stages: dict[str, Stage]) -> None:
    stage = stages[service]
    (cmd,) = stage.all("CMD")
    assert exec_form(cmd) == ["crm", "serve", service]
    assert not resolve(stage, stages, "ENTRYPOINT"), "an ENTRYPOINT would change what CMD runs"


@pytest.mark.parametrize("service", SERVICES)
def test_image_runs_as_a_numeric_non_root_user(service: str, stages: dict[str, Stage]) -> None:
    users = resolve(stages[service], stages, "USER")
    assert users, f"{service} runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, (
        f"{service}: USER {users[-1]} (numeric, so runAsNonRoot can verify it)"
    )


@pytest.mark.parametrize("service", SERVICES)
def test_image_has_the_grpc_health_check(service: str, stages: dict[str, Stage]) -> None:
    checks = resolve(stages[service], stages, "HEALTHCHECK")
    assert checks, f"{service} has no HEALTHCHECK"
    options, _, command = checks[-1].partition("CMD ")
    assert exec_form(command) == ["python", "-m", "shared.healthcheck"]
    assert "--interval=" in options and "--timeout=" in options


@pytest.mark.parametrize("service", SERVICES)
def test_image_listens_on_the_container_ports(service: str, stages: dict[str, Stage]) -> None:
    env = " ".join(resolve(stages[service], stages, "ENV"))
    assert f"CRM_PORT={GRPC_PORT}" in env
    assert f"CRM_METRICS_PORT={METRICS_PORT}" in env
    assert "CRM_LISTEN_HOST=0.0.0.0" in env
    exposed = {int(p) for line in resolve(stages[service], stages, "EXPOSE") for p in line.split()}
    assert exposed == {GRPC_PORT, METRICS_PORT}


def test_base_images_are_slim_python_and_pinned(stages: dict[str, Stage]) -> None:
    bases = {stage.base for stage in stages.values() if stage.base not in stages}
    assert len(bases) == 1, f"the build and runtime stages must share one base image: {bases}"
    (base,) = bases
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim-[a-z]+", base), base


def test_multi_stage_runtime_copies_only_the_virtualenv(stages: dict[str, Stage]) -> None:
    runtime = stages["runtime"]
    copies = runtime.all("COPY")
    assert copies == ["--from=build /opt/crm /opt/crm"]
    assert not runtime.all("ARG") and "pip" not in " ".join(runtime.all("RUN"))


def test_build_installs_with_the_pinned_constraints(stages: dict[str, Stage]) -> None:
    build = stages["build"]
    assert "-c constraints.txt" in " ".join(build.all("RUN"))
    copies = build.all("COPY")
    assert "pyproject.toml constraints.txt ./" in copies
    for package in ("crm", "shared", "services", "gateway", "cli"):
        assert f"{package} ./{package}" in copies, package


def test_dockerignore_admits_what_the_build_copies() -> None:
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    admitted = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert admitted == {"pyproject.toml", "constraints.txt", "crm", "shared", "services", "gateway", "cli"}


def test_compose_builds_each_service_from_its_stage(
    compose: dict[str, Any], stages: dict[str, Stage]
) -> None:
    built = {}
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is None:
            continue
        assert build["dockerfile"] == "deploy/images/Dockerfile"
        assert build["target"] in SERVICES
        assert service["image"] == f"crm-{build['target']}:dev"
        assert name == build["target"] or name.startswith(f"{build['target']}-shard-")
        assert "command" not in service and "entrypoint" not in service
        built[name] = build["target"]
    assert set(built.values()) == set(SERVICES)
