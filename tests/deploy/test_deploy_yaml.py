"""Every YAML file under deploy/ parses, every Kubernetes object is well formed, and every
kustomization lists exactly the files beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.deploy.deploy_support import (
    BASE,
    DEPLOY,
    K8S,
    ROOT,
    SERVICES,
    load_yaml_documents,
    render_kustomization,
    yaml_files,
)

pytestmark = pytest.mark.unit

KUSTOMIZATION_DIRS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def test_deploy_has_yaml_files() -> None:
    assert len(yaml_files()) > 20


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_file_parses(path: Path) -> None:
    documents = load_yaml_documents(path)
    assert documents, f"{path} holds no document"
    for document in documents:
        assert isinstance(document, dict), f"{path}: a document is not a mapping"


def _manifest_files() -> list[Path]:
    return [
        p
        for p in yaml_files()
        if p.is_relative_to(K8S) and p.name != "kustomization.yaml" and not p.is_relative_to(K8S / "nats")
    ]


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_objects_are_well_formed(path: Path) -> None:
    for document in load_yaml_documents(path):
        assert document.get("apiVersion"), f"{path}: object without apiVersion"
        assert document.get("kind"), f"{path}: object without kind"
        assert document.get("metadata", {}).get("name"), f"{path}: {document['kind']} without a name"
        # Namespaces come from the overlays, never from the files.
        assert "namespace" not in document["metadata"] or document["kind"] == "Namespace"


@pytest.mark.parametrize("directory", KUSTOMIZATION_DIRS, ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_lists_exactly_what_exists(directory: Path) -> None:
    kustomization: dict[str, Any] = load_yaml_documents(directory / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization.get("resources", [])
    assert len(resources) == len(set(resources)), f"{directory}: a resource is listed twice"
    for entry in resources:
        target = (directory / entry).resolve()
        assert target.exists(), f"{directory}/kustomization.yaml lists {entry}, which does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").exists(), f"{entry} is a directory without a kustomization"
    patch_files = {
        (directory / patch["path"]).resolve() for patch in kustomization.get("patches", []) if "path" in patch
    }
    for patch_file in patch_files:
        assert patch_file.exists(), f"{directory}: patch {patch_file} does not exist"
    listed = {(directory / entry).resolve() for entry in resources}
    for path in sorted(directory.iterdir()):
        if path.name == "kustomization.yaml":
            continue
        if path.suffix in {".yaml", ".yml"}:
            assert path in listed | patch_files, (
                f"{path.relative_to(ROOT)} exists but its kustomization omits it"
            )


def test_base_reaches_every_manifest_under_it() -> None:
    rendered = {doc["metadata"]["annotations"]["test/source"] for doc in render_kustomization(BASE)}
    on_disk = {str(p.relative_to(ROOT)) for p in BASE.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert on_disk == rendered


def test_base_object_names_are_unique() -> None:
    seen: set[tuple[str, str]] = set()
    for doc in render_kustomization(BASE):
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"{key} is defined twice"
        seen.add(key)


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_overlay_builds_on_the_base_and_sets_a_namespace(overlay: str) -> None:
    directory = K8S / "overlays" / overlay
    kustomization: dict[str, Any] = load_yaml_documents(directory / "kustomization.yaml")[0]
    assert "../../base" in kustomization["resources"]
    namespace = kustomization["namespace"]
    namespaces = [
        doc
        for entry in kustomization["resources"]
        if entry.endswith(".yaml")
        for doc in load_yaml_documents(directory / entry)
        if doc["kind"] == "Namespace"
    ]
    assert [ns["metadata"]["name"] for ns in namespaces] == [namespace]
    image_names = {image["name"] for image in kustomization["images"]}
    assert image_names == {f"crm-{service}" for service in SERVICES}
