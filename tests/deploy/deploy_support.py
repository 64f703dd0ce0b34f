"""Helpers for the deploy/ tests: YAML documents, the kustomize base rendered without a
kustomize binary, the Dockerfile's stages, and the settings classes that name every variable.

Everything here reads files; nothing needs a cluster, a Docker engine or the network.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
COMPOSE_FILE = DEPLOY / "compose" / "compose.yaml"
DOCKERFILE = DEPLOY / "images" / "Dockerfile"

#: Every process is `crm serve <service>` with one of these (the contract `crm up` follows too).
SERVICES = ("tenant", "audit", "core-entity", "custom-object", "gateway")
BACKENDS = ("tenant", "audit", "core-entity", "custom-object")
SHARDED = ("core-entity", "custom-object")
#: The settings class each service reads (shared/config.py).
SETTINGS_CLASS = {
    "tenant": "TenantSettings",
    "audit": "AuditSettings",
    "core-entity": "ShardServiceSettings",
    "custom-object": "ShardServiceSettings",
    "gateway": "GatewaySettings",
}
#: Variables the manifests already set for settings that are announced but not yet in
#: shared/config.py. Each is accepted only while no settings class defines it.
PENDING_SETTINGS = {}
GRPC_PORT = 50051
METRICS_PORT = 9100


def load_yaml_documents(path: Path) -> list[Any]:
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"} and p.is_file())


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """The resources a kustomization collects, recursively (patches and transformers are not
    applied: the base uses none)."""
    kustomization = load_yaml_documents(directory / "kustomization.yaml")[0]
    documents: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            documents.extend(render_kustomization(target))
        else:
            for doc in load_yaml_documents(target):
                doc.setdefault("metadata", {})["annotations"] = {
                    **doc["metadata"].get("annotations", {}),
                    "test/source": str(target.relative_to(ROOT)),
                }
                documents.append(doc)
    return documents


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages of a Dockerfile, with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert match, f"cannot parse FROM {args!r}"
            stages.append(Stage(name=match.group(2) or match.group(1), base=match.group(1)))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def resolve(stage: Stage, stages: dict[str, Stage], keyword: str) -> list[str]:
    """A keyword's values in a stage and the stages it is built FROM, nearest last."""
    chain = []
    current: Stage | None = stage
    while current is not None:
        chain.append(current)
        current = stages.get(current.base)
    return [value for s in reversed(chain) for value in s.all(keyword)]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def settings_classes() -> dict[str, type[BaseSettings]]:
    import shared.config

    return {
        name: obj
        for name, obj in vars(shared.config).items()
        if inspect.isclass(obj) and issubclass(obj, BaseSettings) and obj is not BaseSettings
    }


def env_names(settings: type[BaseSettings]) -> tuple[set[str], set[str]]:
    """(every variable the class reads, the variables it requires)."""
    prefix = settings.model_config.get("env_prefix", "")
    every = {f"{prefix}{name}".upper() for name in settings.model_fields}
    required = {
        f"{prefix}{name}".upper() for name, info in settings.model_fields.items() if info.is_required()
    }
    return every, required


def kind(docs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == name]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) matches a label set."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def container_env(container: dict[str, Any], config_maps: dict[str, dict[str, str]]) -> dict[str, str | None]:
    """Variables a container gets: from envFrom ConfigMaps, then env (value, or None when it
    comes from a Secret)."""
    result: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"only ConfigMaps are expected in envFrom: {source}"
        result.update(config_maps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        result[item["name"]] = item.get("value")
    return result


def workload_service(workload: dict[str, Any]) -> str:
    return workload["metadata"]["labels"]["app.kubernetes.io/name"]


def iter_workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield from (d for d in docs if d.get("kind") in {"Deployment", "Job"})
