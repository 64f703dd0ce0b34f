"""Fixtures for the deploy/ tests (helpers live in tests/deploy/deploy_support.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.deploy_support import (
    BASE,
    COMPOSE_FILE,
    DOCKERFILE,
    Stage,
    kind,
    load_yaml_documents,
    parse_dockerfile,
    render_kustomization,
)


@pytest.fixture(scope="session")
def base_docs() -> list[dict[str, Any]]:
    return render_kustomization(BASE)


@pytest.fixture(scope="session")
def config_maps(base_docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {cm["metadata"]["name"]: cm.get("data", {}) for cm in kind(base_docs, "ConfigMap")}


@pytest.fixture(scope="session")
def deployments(base_docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return kind(base_docs, "Deployment")


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = load_yaml_documents(COMPOSE_FILE)[0]
    return document


@pytest.fixture(scope="session")
def stages() -> dict[str, Stage]:
    return {stage.name: stage for stage in parse_dockerfile(DOCKERFILE)}
