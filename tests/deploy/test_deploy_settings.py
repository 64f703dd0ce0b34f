"""Every CRM_* variable set in the manifests, the Compose file and the Dockerfile is a field of
the settings class the process reads (shared/config.py), and every required field is set."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.deploy.deploy_support import (
    BASE,
    PENDING_SETTINGS,
    SERVICES,
    SETTINGS_CLASS,
    container_env,
    env_names,
    iter_workloads,
    kind,
    pod_spec,
    render_kustomization,
    resolve,
    settings_classes,
    workload_service,
)

pytestmark = pytest.mark.unit

BASE_DOCS = render_kustomization(BASE)
CONFIG_MAPS = {cm["metadata"]["name"]: cm.get("data", {}) for cm in kind(BASE_DOCS, "ConfigMap")}
WORKLOADS = list(iter_workloads(BASE_DOCS))
REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _known(service: str) -> tuple[set[str], set[str]]:
    classes = settings_classes()
    every, required = env_names(classes[SETTINGS_CLASS[service]])
    all_fields = set().union(*(env_names(c)[0] for c in classes.values()))
    pending = {name for name in PENDING_SETTINGS if name not in all_fields}
    return every | pending, required


def _check(where: str, service: str, env: dict[str, Any]) -> None:
    allowed, required = _known(service)
    crm = {name for name in env if name.startswith("CRM_")}
    unknown = crm - allowed
    assert not unknown, f"{where}: {sorted(unknown)} are not fields of {SETTINGS_CLASS[service]}"
    missing = required - crm
    assert not missing, f"{where}: required settings {sorted(missing)} are not set"


def test_settings_classes_are_found() -> None:
    classes = settings_classes()
    assert set(SETTINGS_CLASS.values()) <= set(classes)
    for settings in classes.values():
        assert settings.model_config.get("env_prefix") == "CRM_"


def test_config_maps_hold_only_settings() -> None:
    every = set().union(*(env_names(c)[0] for c in settings_classes().values())) | set(PENDING_SETTINGS)
    for name, data in CONFIG_MAPS.items():
        assert set(data) <= every, f"ConfigMap {name}: {sorted(set(data) - every)} are not settings"


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: f"{w['kind']}/{w['metadata']['name']}")
def test_workload_environment_matches_its_settings_class(workload: dict[str, Any]) -> None:
    service = workload_service(workload)
    assert service in SERVICES
    (container,) = pod_spec(workload)["containers"]
    env = container_env(container, CONFIG_MAPS)
    _check(f"{workload['kind']} {workload['metadata']['name']}", service, env)
    # A variable outside the settings exists only to be spliced into one that is a setting.
    spliced = {ref for value in env.values() if value for ref in REFERENCE.findall(value)}
    for name in env:
        if not name.startswith("CRM_"):
            assert name in spliced, f"{workload['metadata']['name']}: {name} is neither a setting nor used"
    for ref in spliced:
        assert ref in env, f"{workload['metadata']['name']}: $({ref}) is not defined"
        order = [item["name"] for item in container.get("env", [])]
        users = [n for n, v in env.items() if v and f"$({ref})" in v]
        for user in users:
            assert order.index(ref) < order.index(user), f"$({ref}) must be defined before {user}"


def test_compose_environment_matches_settings(compose: dict[str, Any]) -> None:
    checked = 0
    for name, service in compose["services"].items():
        target = service.get("build", {}).get("target")
        if target is None:
            assert not any(k.startswith("CRM_") for k in service.get("environment", {})), name
            continue
        _check(f"compose service {name}", target, service["environment"])
        checked += 1
    assert checked == 7


def test_dockerfile_environment_names_are_settings(stages: Any) -> None:
    every = set().union(*(env_names(c)[0] for c in settings_classes().values())) | set(PENDING_SETTINGS)
    for stage in stages.values():
        for line in resolve(stage, stages, "ENV"):
            for name in re.findall(r"(?:^|\s)(CRM_[A-Z0-9_]+)=", line):
                assert name in every, f"Dockerfile sets {name}, which no settings class reads"
