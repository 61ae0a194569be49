#!/usr/bin/env bash
# Freeze edge-runtime for arm64 inside the emulated Raspberry Pi OS (scripts/arm64-rootfs.sh)
# and run the executable's selftest there. PyInstaller does not cross-compile, so it has to run
# on aarch64; the emulated system has no network, so everything it installs is fetched here.
#
# Usage: scripts/freeze-arm64.sh BUNDLE PUBKEY OUTDIR     (root, like arm64-rootfs.sh)
#   OUTDIR/wheels/   aarch64 wheels for CPython 3.11, plus edgepack's own wheel
#   OUTDIR/frozen/   the frozen executable (onefile/edge-runtime)
# PyInstaller also needs objdump (Debian's binutils) and libpython3.11.so.1.0 (libpython3.11),
# which the minbase root file system lacks. FREEZE_TOOLS=DIR: a tree holding them, e.g.
# Debian bookworm arm64 .debs unpacked with dpkg-deb -x (usr/bin, usr/lib/aarch64-linux-gnu).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$REPO/.venv/bin/python"
[ "$#" = 3 ] || { sed -n 6,11p "${BASH_SOURCE[0]}" >&2; exit 2; }
BUNDLE="$(realpath "$1")"
PUBKEY="$(realpath "$2")"
mkdir -p "$3"
OUT="$(realpath "$3")"
log() { echo "==> $*" >&2; }

# The wheels the freeze needs inside: the runtime's dependencies, the packager's CLI (rich,
# pyyaml), PyInstaller, and the onnx backend and telemetry the executable bundles.
PACKAGES=(pyinstaller pyinstaller-hooks-contrib altgraph packaging setuptools
          rich markdown-it-py mdurl pygments pyyaml click
          pydantic pydantic-core annotated-types typing-extensions typing-inspection
          numpy onnxruntime flatbuffers protobuf cryptography cffi pycparser paho-mqtt)
# Every manylinux tag a glibc 2.36 system (bookworm) accepts, newest first down to 2.17:
# most aarch64 wheels on PyPI are manylinux2014, which pip only takes when asked.
platforms=()
for minor in $(seq 28 -1 17); do platforms+=(--platform "manylinux_2_${minor}_aarch64"); done
platforms+=(--platform manylinux2014_aarch64)

log "downloading aarch64 wheels into $OUT/wheels"
nice -n 15 "$PY" -m pip download --quiet --only-binary=:all: "${platforms[@]}" \
    --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
    -d "$OUT/wheels" "${PACKAGES[@]}"
# edgepack itself is pure Python, so a wheel built here installs there unchanged.
log "building edgepack's wheel"
nice -n 15 "$PY" -m pip wheel --quiet --no-deps -w "$OUT/wheels" "$REPO"

# One bound folder holds everything the emulated system sees: wheels, inputs, results.
rm -rf "$OUT/input" "$OUT/tools" "$OUT/frozen"
mkdir -p "$OUT/input" "$OUT/tools"
cp "$BUNDLE" "$PUBKEY" "$OUT/input/"
[ -n "${FREEZE_TOOLS:-}" ] && cp -a "$FREEZE_TOOLS/." "$OUT/tools/"

# Runs inside, under emulation. /tmp there is a fresh tmpfs per run, so the venv, the
# freeze and the selftest all happen in this one invocation.
# shellcheck disable=SC2016  # expanded inside, by the emulated bash
INNER='
set -euo pipefail
out=$1; bundle=$out/input/$2; pubkey=$out/input/$3
tools=$out/tools; libs=/usr/lib/aarch64-linux-gnu
export PATH="$tools/usr/bin:$PATH"
TIMEFORMAT="%R s"
echo "==> [arm64] $(uname -m), $(python3 --version)"
# PyInstaller refuses to start without objdump, and Debian links python3 statically, so the
# shared libpython it bundles is a separate package. Check both before the slow part.
missing=""
command -v ldd >/dev/null || missing+=" ldd(libc-bin)"
command -v objdump >/dev/null || missing+=" objdump(binutils)"
[ -e "$libs/libpython3.11.so.1.0" ] || [ -e "$tools$libs/libpython3.11.so.1.0" ] \
    || missing+=" libpython3.11.so.1.0(libpython3.11)"
if [ -n "$missing" ]; then
    echo "error: PyInstaller needs, and this system lacks:$missing; set FREEZE_TOOLS" >&2
    exit 3
fi
python3 -m venv /tmp/venv
echo "==> [arm64] pip install (offline)"
# No extras: --no-index cannot resolve "edgepack[...]" any better than naming the packages.
time /tmp/venv/bin/pip install --quiet --no-index --find-links "$out/wheels" \
    edgepack numpy pydantic click cryptography pyinstaller rich pyyaml onnxruntime paho-mqtt
echo "==> [arm64] edgepack freeze (PyInstaller under emulation: slow)"
# LD_LIBRARY_PATH: how PyInstaller finds a libpython (and objdump its libraries) in $tools.
time LD_LIBRARY_PATH="$tools$libs" /tmp/venv/bin/python -m packager.cli freeze \
    --profile raspberry-pi-4 --backend onnx -o "$out/frozen" --form onefile
exe=$out/frozen/onefile/edge-runtime
echo "==> [arm64] executable: $(stat -c %s "$exe") bytes ($(du -h "$exe" | cut -f1))"
# env -i: no PATH, no venv, no Python on the way; only the executable itself.
echo "==> [arm64] time of edge-runtime --help"
time env -i "$exe" --help >/dev/null
echo "==> [arm64] time of edge-runtime selftest"
time env -i "$exe" selftest "$bundle" --pubkey "$pubkey"
'
log "freezing inside the emulated arm64 system (10-20 minutes)"
start=$SECONDS
ARM64_BIND="$OUT" nice -n 15 "$REPO/scripts/arm64-rootfs.sh" run -- \
    bash -c "$INNER" inner "$OUT" "$(basename "$BUNDLE")" "$(basename "$PUBKEY")"
log "done in $((SECONDS - start)) s: $OUT/frozen/onefile/edge-runtime"
