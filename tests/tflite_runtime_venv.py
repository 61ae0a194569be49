"""A venv with ``tflite-runtime`` 2.14 instead of ai-edge-litert: the fallback interpreter.

tflite-runtime's last release was built against numpy 1.x, so it cannot share the dev
venv (numpy 2). This venv holds only the device runtime's dependencies, numpy<2 and
tflite-runtime; the tests run ``edge_runtime`` from the checkout in it (``PYTHONPATH``).
It lives under ``~/.cache/edgepack`` so a clean clone in CI reuses it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = [
    "tflite-runtime==2.14.0",
    "numpy>=1.24,<2",
    "pydantic>=2.6",
    "click>=8.1",
    "cryptography>=42",
]


def venv_dir() -> Path:
    digest = hashlib.sha256("\n".join(REQUIREMENTS).encode()).hexdigest()[:12]
    default = Path.home() / ".cache" / "edgepack" / f"tflite-runtime-{digest}"
    return Path(os.environ.get("EDGEPACK_TFLITE_RUNTIME_VENV", default))


def ensure_tflite_runtime_venv() -> Path | None:
    """The venv's python, creating the venv on first use; None when pip cannot install it
    here (tflite-runtime has wheels for CPython 3.8 to 3.11 on Linux only)."""
    root = venv_dir()
    python, stamp = root / "bin" / "python", root / ".complete"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists():
            return python
        shutil.rmtree(root, ignore_errors=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(root)], check=True)
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *REQUIREMENTS],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            if "No matching distribution found for tflite-runtime" in done.stderr:
                return None
            raise RuntimeError(f"creating the tflite-runtime venv failed:\n{done.stderr[-3000:]}")
        stamp.write_text("\n".join(REQUIREMENTS) + "\n")
    return python


def run_in_venv(python: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python args`` with the checkout importable and nothing from the dev venv."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONPATH": str(REPO),
        **kwargs.pop("env", {}),
    }
    return subprocess.run(
        [str(python), *args], capture_output=True, text=True, env=env, timeout=300, **kwargs
    )
