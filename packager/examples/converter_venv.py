"""A private venv holding Google's litert-torch converter, for the TFLite example model.

litert-torch pulls a 1.1 GiB download, 2.1 GiB installed (jax, jaxlib, transformers 5,
litert-converter), and downgrades typing-extensions, so it cannot live in the dev venv. Its
venv sits outside the checkout, named by a hash of its pins, so clean clones (CI) on one
machine reuse it, as they reuse the arm64 root file system of ``scripts/arm64-rootfs.sh``.
Scripts that need the converter run in it as subprocesses (``run_converter_script``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import PackagerError

# What the converter scripts import, pinned exactly. torch must be the local CPU build
# (found through pip's find-links); any other resolution pulls GBs of CUDA wheels.
CONVERTER_REQUIREMENTS = (
    "torch==2.13.0",
    "litert-torch==0.10.0",
    "ai-edge-litert==2.3.0",
)
# Every other package, as pip resolved the requirements above (CPython 3.11, x86-64, pip
# freeze of a fresh venv), so that a new release of one cannot change the converter later.
# To move a pin: build with only the requirements, then paste the new freeze here.
CONVERTER_CONSTRAINTS = CONVERTER_REQUIREMENTS + (
    "absl-py==2.5.1",
    "ai-edge-quantizer==0.10.0",
    "annotated-doc==0.0.7",
    "annotated-types==0.8.0",
    "anyio==4.14.2",
    "backports.strenum==1.2.8",
    "certifi==2026.10.18",
    "charset-normalizer==3.5.2",
    "click==8.5.1",
    "filelock==4.2.11",
    "fire==0.7.1",
    "flatbuffers==25.12.19",
    "fsspec==2026.9.0",
    "h11==0.16.0",
    "hf-xet==1.8.0",
    "httpcore2==2.16.2",
    "httpx2==2.16.2",
    "huggingface_hub==2.4.0",
    "idna==3.20",
    "immutabledict==4.2.1",
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "jaxtyping==0.3.11",
    "Jinja2==3.1.6",
    "kagglehub==1.0.2",
    "kagglesdk==0.1.37",
    "lark==1.3.1",
    "litert-converter==0.5.0",
    "litert-lm-builder==0.18.1",
    "markdown-it-py==4.3.0",
    "MarkupSafe==3.0.4",
    "mdurl==0.1.2",
    "ml_dtypes==0.6.0",
    "mpmath==1.3.0",
    "multipledispatch==1.0.0",
    "networkx==3.6.1",
    "numpy==2.4.6",
    "opt_einsum==3.4.0",
    "ordered-set==4.1.0",
    "packaging==26.3",
    "pillow==13.0.0",
    "protobuf==7.36.2",
    "pydantic==2.11.10",
    "pydantic_core==2.33.2",
    "Pygments==2.21.0",
    "PyYAML==6.0.3",
    "regex==2026.11.15",
    "requests==2.34.2",
    "rich==15.0.0",
    "safetensors==0.8.0",
    "scipy==1.17.1",
    "sentencepiece==0.2.3",
    "shellingham==1.5.4",
    "sympy==1.14.0",
    "tabulate==0.10.0",
    "termcolor==3.3.0",
    "tokenizers==0.23.3",
    "tomli==2.5.0",
    "torchao==0.18.0",
    "tqdm==4.70.1",
    "transformers==5.23.0",
    "truststore==0.10.5",
    "typer==0.29.2",
    "typing-inspection==0.4.2",
    "typing_extensions==4.12.2",
    "urllib3==2.8.0",
    "wadler_lindig==0.1.8",
    "xdsl==0.28.0",
)
STAMP_NAME = ".edgepack-converter.stamp"
_TAIL_LINES = 40


def converter_venv_dir() -> Path:
    """``$EDGEPACK_CONVERTER_VENV``, or a folder under the user cache named by the pins."""
    configured = os.environ.get("EDGEPACK_CONVERTER_VENV")
    if configured:
        return Path(configured).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = pins_digest(CONVERTER_REQUIREMENTS, CONVERTER_CONSTRAINTS)
    return cache / "edgepack" / f"litert-converter-{digest[:12]}"


def ensure_converter_venv() -> Path:
    """Create the converter venv unless a finished one exists; return its python.

    The first build downloads 1.1 GiB and takes a minute or more.

    Raises:
        PackagerError: if creating the venv or installing the pinned packages fails.
    """
    return ensure_pinned_venv(
        converter_venv_dir(),
        CONVERTER_REQUIREMENTS,
        CONVERTER_CONSTRAINTS,
        label="the litert-torch converter venv (2.1 GiB on disk)",
    )


def ensure_pinned_venv(
    venv: Path, requirements: tuple[str, ...], constraints: tuple[str, ...], label: str
) -> Path:
    """Create ``venv`` with ``requirements`` unless a finished one exists; return its python.

    A folder without the completion stamp is a build that died half-way: it is removed and
    built again. The stamp holds the pins' digest, so a venv at a fixed path is also rebuilt
    when the pins change. A file lock keeps two processes from building it at once (the
    second waits, then reuses the first's).

    Raises:
        PackagerError: if creating the venv or installing the packages fails.
    """
    python = venv / "bin" / "python"
    stamp = pins_digest(requirements, constraints) + "\n"
    if _is_finished(venv, stamp):
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(venv.with_name(venv.name + ".lock"), label):
        if _is_finished(venv, stamp):  # another process built it while this one waited
            return python
        _remove_unfinished(venv)
        started = time.monotonic()
        _say(f"creating {label} at {venv}")
        base = Path(getattr(sys, "_base_executable", None) or sys.executable)
        _check_call([str(base), "-m", "venv", str(venv)], f"creating a venv with {base}")
        command = [str(python), "-m", "pip", "install", "--no-input", "--progress-bar", "off"]
        requirements_file = venv / "edgepack-requirements.txt"
        requirements_file.write_text("\n".join(requirements) + "\n")
        command += ["-r", str(requirements_file)]
        if constraints:
            constraints_file = venv / "edgepack-constraints.txt"
            constraints_file.write_text("\n".join(constraints) + "\n")
            command += ["-c", str(constraints_file)]
        _say(f"installing {', '.join(requirements)} (a minute or more)")
        _check_call(command, f"installing the pinned packages of {label}")
        (venv / STAMP_NAME).write_text(stamp)
        _say(f"{label} ready in {time.monotonic() - started:.0f}s")
    return python


def run_converter_script(script: Path, *args: object) -> None:
    """Run ``script`` with ``args`` by the converter venv's python (built first if needed).

    Raises:
        PackagerError: if the venv cannot be built or the script fails.
    """
    python = ensure_converter_venv()
    _say(f"running {script.name} in the litert-torch converter venv")
    # -I keeps the script's folder off sys.path, so edgepack's example modules there can
    # never shadow a converter package (litert-converter imports as `litert_converter`).
    _check_call(
        [str(python), "-I", str(script), *(str(arg) for arg in args)],
        f"running {script.name} in the converter venv {python.parent.parent}",
        hint=f"if the venv itself is broken, remove {python.parent.parent} and run again",
    )


def pins_digest(requirements: tuple[str, ...], constraints: tuple[str, ...] = ()) -> str:
    # The base interpreter's version is part of the key: a venv only works with its own.
    text = f"python{sys.version_info.major}.{sys.version_info.minor}\n" + "\n".join(
        requirements + ("--",) + constraints
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _is_finished(venv: Path, stamp: str) -> bool:
    path = venv / STAMP_NAME
    return path.is_file() and path.read_text() == stamp


def _remove_unfinished(venv: Path) -> None:
    if not venv.exists():
        return
    # Only ever delete what looks like a venv: $EDGEPACK_CONVERTER_VENV may name any folder.
    if any(venv.iterdir()) and not (venv / "pyvenv.cfg").is_file():
        raise PackagerError(f"{venv} exists but is not a venv; remove it or choose another folder")
    _say(f"removing the unfinished (or outdated) venv at {venv}")
    shutil.rmtree(venv)


@contextlib.contextmanager
def _exclusive_lock(path: Path, label: str) -> Iterator[None]:
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process building {label} ({path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_call(command: list[str], what: str, hint: str | None = None) -> None:
    env = dict(os.environ)
    # The caller's import path must not leak into the converter venv's interpreter.
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"):
        env.pop(name, None)
    try:
        proc = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
    except OSError as exc:
        raise PackagerError(f"{what} failed: {exc}") from exc
    if proc.returncode == 0:
        return
    tail = "\n".join(proc.stdout.splitlines()[-_TAIL_LINES:])
    fix = hint or (
        "check the network and disk space, then run again; the half-built venv is removed "
        "on the next run"
    )
    raise PackagerError(f"{what} failed (exit {proc.returncode}); {fix}. Output tail:\n{tail}")


def _say(message: str) -> None:
    print(f"edgepack: {message}", file=sys.stderr, flush=True)
