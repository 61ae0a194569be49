"""The device CLI starts without importing any inference engine (instant --help)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["edge_runtime.cli", "packager.cli", "edge_runtime"])
def test_cli_modules_import_no_engine(module):
    probe = (
        f"import sys, {module}; "
        "print(sorted(m for m in ('onnxruntime', 'onnx', 'numpy', 'torch', 'rich') "
        "if m in sys.modules))"
    )

    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()

    assert loaded == "[]"
