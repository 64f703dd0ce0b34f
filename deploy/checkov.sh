#!/usr/bin/env bash
# Static security scan of everything under deploy/ (Dockerfile, Kubernetes manifests, Helm values,
# Compose file) with checkov from PyPI.
#
# checkov pulls in a few hundred packages, so it lives in its own virtual environment
# (.venv-checkov at the repository root, or $CHECKOV_VENV), apart from the project's .venv.
# Skipped checks are listed, each with its justification, in deploy/.checkov.yaml.
#
# Usage: bash deploy/checkov.sh        (exit status 0 only when checkov reports no failed check)
set -euo pipefail

CHECKOV_VERSION="3.3.30"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CHECKOV_VENV:-$ROOT/.venv-checkov}"
PYTHON="${PYTHON:-python3}"

cd "$ROOT"
if [[ ! -x "$VENV/bin/checkov" ]] || [[ "$("$VENV/bin/pip" show checkov 2>/dev/null | sed -n 's/^Version: //p')" != "$CHECKOV_VERSION" ]]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
fi

# Offline: no Bridgecrew/Prisma platform, no version check, no download of external modules.
export BC_SKIP_MAPPING=TRUE
export CHECKOV_RUN_SCA_PACKAGE_SCAN_V2=false
export ENABLE_DEFINITION_KEY=False
exec "$VENV/bin/checkov" --config-file deploy/.checkov.yaml -d deploy --quiet --compact "$@"
