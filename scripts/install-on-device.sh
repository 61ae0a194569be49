#!/usr/bin/env bash
# Install edgepack's device runtime from a bundle's offline wheelhouse: no network needed.
#
#   install-on-device.sh BUNDLE.edgepkg --pubkey edgepack.pub [--venv DIR] [--find-links DIR]
#
# Order of checks, so nothing unverified is installed or run:
#   1. the manifest's Ed25519 signature, with openssl (>= 3.0) when the device has it;
#   2. every wheel in BUNDLE.wheels/ against the sha256 the signed manifest lists (extra
#      or missing files are refused);
#   3. pip install --no-index --require-hashes into a fresh venv;
#   4. edge-runtime info: the runtime itself re-verifies signature and every bundle hash.
#      Without openssl, this is where the signature is first checked; on failure the venv
#      is removed again.
# --find-links adds wheels PyPI lacks for this platform (e.g. a llama-cpp-python wheel built
# once on a device); they are not in the signed manifest, so their hashes are shown.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
[ $# -ge 1 ] || usage 2
case "$1" in -h|--help) usage 0 ;; esac
BUNDLE="$1"; shift
PUBKEY="" VENV="" EXTRA=""
while [ $# -gt 0 ]; do
    case "$1" in
        --pubkey) PUBKEY="$2"; shift 2 ;;
        --venv) VENV="$2"; shift 2 ;;
        --find-links) EXTRA="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "unknown option $1" >&2; usage 2 ;;
    esac
done
[ -f "$BUNDLE" ] || { echo "error: bundle $BUNDLE does not exist" >&2; exit 1; }
[ -n "$PUBKEY" ] && [ -f "$PUBKEY" ] || {
    echo "error: --pubkey FILE is required (the public key that signed the bundle)" >&2; exit 1; }
WHEELS="${BUNDLE%.edgepkg}.wheels"
[ -d "$WHEELS" ] || {
    echo "error: no wheelhouse at $WHEELS; build with: edgepack build ... --with-wheels" >&2; exit 1; }
VENV="${VENV:-$HOME/.local/share/edgepack/venv}"
PYTHON="$(command -v python3 || true)"
[ -n "$PYTHON" ] || { echo "error: python3 not found (Raspberry Pi OS: apt install python3-venv)" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# Steps 1-2 need only the standard library: read the manifest out of the tar, check hashes,
# and write a requirements file that pins every wheel by name, version and sha256.
"$PYTHON" - "$BUNDLE" "$WHEELS" "$WORK" "$EXTRA" <<'PY'
import hashlib, json, pathlib, sys, tarfile

bundle, wheels, work, extra = sys.argv[1:5]
work = pathlib.Path(work)
with tarfile.open(bundle, "r:") as archive:
    for name in ("manifest.json", "manifest.sig"):
        member = archive.getmember(name)
        if not member.isfile() or member.size > 8 * 2**20:
            sys.exit(f"error: {bundle}: {name} is not a regular file of sane size")
        (work / name).write_bytes(archive.extractfile(member).read())
spec = json.loads((work / "manifest.json").read_bytes()).get("wheelhouse")
if not spec:
    sys.exit(f"error: {bundle} was built without --with-wheels: its manifest lists no wheels")

def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

folder = pathlib.Path(wheels)
listed = {entry["name"]: entry for entry in spec["wheels"]}
present = {path.name for path in folder.glob("*.whl")}
if present - set(listed):
    sys.exit(f"error: {folder} holds wheels the manifest does not list: {sorted(present - set(listed))}")
if set(listed) - present:
    sys.exit(f"error: {folder} lacks wheels the manifest lists: {sorted(set(listed) - present)}")
lines = []
for name, entry in sorted(listed.items()):
    if sha256(folder / name) != entry["sha256"]:
        sys.exit(f"error: {name} does not match the sha256 in the signed manifest; refusing it")
    dist, version = name.split("-")[:2]
    lines.append(f"{dist}=={version} --hash=sha256:{entry['sha256']}")
if extra:
    for path in sorted(pathlib.Path(extra).glob("*.whl")):
        digest = sha256(path)
        print(f"note: {path.name} is not in the signed manifest (sha256 {digest})")
        dist, version = path.name.split("-")[:2]
        lines.append(f"{dist}=={version} --hash=sha256:{digest}")
for name in spec.get("missing", []):
    if not extra:
        print(f"warning: the wheelhouse has no wheel for {name} on this platform; pass "
              "--find-links DIR with one (see docs/offline-install.md)", file=sys.stderr)
(work / "requirements.txt").write_text("\n".join(lines) + "\n")
print(f"{len(listed)} wheels match the manifest's sha256 ({spec['platform_tag']}, "
      f"CPython {spec['python_version']})")
PY

if command -v openssl >/dev/null 2>&1 &&
    openssl pkeyutl -verify -pubin -inkey "$PUBKEY" -rawin \
        -in "$WORK/manifest.json" -sigfile "$WORK/manifest.sig" >/dev/null 2>&1; then
    echo "manifest signature verified with openssl before installing"
elif command -v openssl >/dev/null 2>&1 && openssl version | grep -q "^OpenSSL [3-9]"; then
    echo "error: the manifest signature does not verify with $PUBKEY; nothing installed" >&2
    exit 1
else
    echo "note: no openssl >= 3 here; the signature is checked right after installing"
fi

"$PYTHON" -m venv "$VENV"
LINKS=(--find-links "$WHEELS")
[ -n "$EXTRA" ] && LINKS+=(--find-links "$EXTRA")
"$VENV/bin/python" -m pip install --quiet --no-index "${LINKS[@]}" --require-hashes \
    -r "$WORK/requirements.txt"
if ! "$VENV/bin/edge-runtime" info "$BUNDLE" --pubkey "$PUBKEY"; then
    echo "error: the bundle did not verify; removing $VENV" >&2
    rm -rf "$VENV"
    exit 1
fi
echo "installed: $VENV/bin/edge-runtime (try: $VENV/bin/edge-runtime selftest $BUNDLE --pubkey $PUBKEY)"
