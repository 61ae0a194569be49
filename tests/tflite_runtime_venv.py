"""A venv with ``tflite-runtime`` 2.14 instead of ai-edge-litert: the fallback interpreter.

tflite-runtime's last release was built against numpy 1.x, so it cannot share the dev
venv (numpy 2). This venv holds only the device runtime's dependencies, numpy<2 and
tflite-runtime; the tests run ``edge_runtime`` from the checkout in it (``PYTHONPATH``).
It lives under ``~/.cache/edgepack`` so a clean clone in CI reuses it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from packager.errors import PackagerError
from packager.examples.converter_venv import ensure_pinned_venv, pins_digest

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = (
    "tflite-runtime==2.14.0",
    "numpy>=1.24,<2",
    "pydantic>=2.6",
    "click>=8.1",
    "cryptography>=42",
)


def venv_dir() -> Path:
    default = (
        Path.home() / ".cache" / "edgepack" / f"tflite-runtime-{pins_digest(REQUIREMENTS)[:12]}"
    )
    return Path(os.environ.get("EDGEPACK_TFLITE_RUNTIME_VENV", default))


def ensure_tflite_runtime_venv() -> Path | None:
    """The venv's python, creating the venv on first use; None when pip cannot install it
    here (tflite-runtime has wheels for CPython 3.8 to 3.11 on Linux only)."""
    try:
        return ensure_pinned_venv(venv_dir(), REQUIREMENTS, (), label="the tflite-runtime venv")
    except PackagerError as exc:
        if "No matching distribution found for tflite-runtime" in str(exc):
            return None
        raise


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
