"""Every check that deploy/.checkov.yaml skips is justified in a comment right above it, and
the scan script pins checkov and uses that configuration. (The scan itself runs as
`bash deploy/checkov.sh`, outside pytest: checkov needs its own virtual environment.)"""

from __future__ import annotations

import re

import pytest

from tests.deploy.deploy_support import DEPLOY, K8S, load_yaml_documents

pytestmark = pytest.mark.unit

CONFIG = DEPLOY / ".checkov.yaml"
SCRIPT = DEPLOY / "checkov.sh"


def _skips_with_comments() -> list[tuple[str, list[str]]]:
    """Each `skip-check` entry with the comment lines directly above it."""
    lines = CONFIG.read_text().splitlines()
    start = lines.index("skip-check:")
    result: list[tuple[str, list[str]]] = []
    comment: list[str] = []
    for line in lines[start + 1 :]:
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("# "))
        elif stripped.startswith("- "):
            result.append((stripped[2:].split("#")[0].strip(), comment))
            comment = []
        elif stripped:
            break
        else:
            comment = []
    return result


def test_config_parses_and_skips_what_it_lists() -> None:
    (config,) = load_yaml_documents(CONFIG)
    assert [check for check, _ in _skips_with_comments()] == config.get("skip-check", [])
    assert set(config["framework"]) >= {"dockerfile", "kubernetes", "secrets"}


@pytest.mark.parametrize("check", [c for c, _ in _skips_with_comments()])
def test_every_skip_is_justified(check: str) -> None:
    (comment,) = [c for name, c in _skips_with_comments() if name == check]
    text = " ".join(comment)
    assert re.fullmatch(r"CKV2?_[A-Z0-9]+_\d+", check), f"skip a single check by id, not {check!r}"
    assert text.startswith(check), f"the comment above {check} must name it"
    assert len(text) - len(check) >= 60, f"{check}: say why it does not apply, not just that it is skipped"


def test_no_inline_skips_without_reason() -> None:
    for path in [*K8S.rglob("*.yaml"), DEPLOY / "images" / "Dockerfile"]:
        for line in path.read_text().splitlines():
            if "checkov:skip" in line or "checkov.io/skip" in line:
                assert re.search(r"CKV2?_[A-Z0-9]+_\d+[:=]\s*\S.{20,}", line), (
                    f"{path}: unjustified inline skip {line!r}"
                )


def test_scan_script_pins_checkov_and_uses_the_config() -> None:
    script = SCRIPT.read_text()
    assert re.search(r'CHECKOV_VERSION="\d+\.\d+\.\d+"', script)
    assert '"checkov==$CHECKOV_VERSION"' in script
    assert "--config-file deploy/.checkov.yaml" in script
    assert "-d deploy" in script
    assert ".venv-checkov" in script
