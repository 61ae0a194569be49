#!/usr/bin/env bash
# The emulated Raspberry Pi OS tests on their own: build (or reuse) the cached arm64 root
# file system, then install a bundle's wheelhouse in it offline and run the bundle there.
# They also run as part of scripts/test.sh; see docs/offline-install.md.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
ensure_venv dev
cd "$REPO"
"$REPO/scripts/arm64-rootfs.sh" create
exec "$VENV/bin/python" -m pytest -m arm64 tests/integration/test_arm64.py "$@"
