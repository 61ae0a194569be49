#!/usr/bin/env bash
# Create or update .venv with the dev extras, then run the tests.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
ensure_venv dev
ensure_debian_packages "${DEBIAN_TEST_PACKAGES[@]}"
cd "$REPO"
exec "$VENV/bin/python" -m pytest "$@"
