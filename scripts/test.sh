#!/usr/bin/env bash
# Create or update .venv with the dev extras, then run the tests.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
ensure_venv dev
ensure_debian_packages "${DEBIAN_TEST_PACKAGES[@]}"
cd "$REPO"
# The shape of the code is checked before the tests: lint, formatting, import contracts.
"$VENV/bin/ruff" check --quiet .
"$VENV/bin/ruff" format --check --quiet .
"$VENV/bin/lint-imports" --no-cache >/dev/null || "$VENV/bin/lint-imports" --no-cache
exec "$VENV/bin/python" -m pytest "$@"
