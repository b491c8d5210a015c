#!/usr/bin/env bash
# Runs the whole test suite as root: installs what is missing (scripts/setup.sh), then
# pytest with the project's venv. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${MEP_VENV:-/opt/mep/venv}
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
