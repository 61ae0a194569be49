"""``edgepack freeze``: a PyInstaller edge-runtime that needs no Python on the device."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from packager.cli import cli
from packager.errors import PackagerError
from packager.freeze import check_host_matches, freeze_runtime, pyinstaller_args
from packager.profiles import load_profile
from tests.packager.test_cli import edgepack

X86 = platform.machine() == "x86_64"


def test_args_include_only_the_chosen_backend(tmp_path):
    args = pyinstaller_args("onefile", ["onnx"], tmp_path / "dist", tmp_path / "work")

    assert "--onefile" in args
    assert args[args.index("--hidden-import") + 1] == "edge_runtime.backends.onnx"
    excluded = {args[i + 1] for i, arg in enumerate(args) if arg == "--exclude-module"}
    assert {"llama_cpp", "edge_runtime.backends.llamacpp", "packager", "torch"} <= excluded
    assert "onnxruntime" not in excluded


def test_args_refuse_an_unknown_backend(tmp_path):
    with pytest.raises(PackagerError) as caught:
        pyinstaller_args("onedir", ["tensorrt"], tmp_path, tmp_path)

    assert "unknown backend" in str(caught.value)
    assert "llamacpp, onnx, tflite" in str(caught.value)


def test_args_for_tflite_name_the_interpreter_module(tmp_path):
    args = pyinstaller_args("onedir", ["tflite"], tmp_path / "dist", tmp_path / "work")

    hidden = {args[i + 1] for i, arg in enumerate(args) if arg == "--hidden-import"}
    assert {"edge_runtime.backends.tflite", "ai_edge_litert.interpreter"} <= hidden
    excluded = {args[i + 1] for i, arg in enumerate(args) if arg == "--exclude-module"}
    assert {"onnxruntime", "llama_cpp"} <= excluded


@pytest.mark.skipif(not X86, reason="the cross-architecture case is checked from an x86 host")
def test_an_arm64_profile_is_refused_on_x86_with_the_way_out():
    with pytest.raises(PackagerError) as caught:
        check_host_matches(load_profile("raspberry-pi-4"))

    message = str(caught.value)
    assert "does not cross-compile" in message and "arm64-rootfs.sh" in message


@pytest.mark.skipif(not X86, reason="the cross-architecture case is checked from an x86 host")
def test_cli_freeze_for_another_architecture_exits_1_with_one_line(tmp_path):
    done = edgepack("freeze", "--profile", "raspberry-pi-5", "--out", str(tmp_path / "x"))

    assert done.returncode == 1
    assert "does not cross-compile" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x").exists()


def test_cli_freeze_needs_exactly_one_profile_source(tmp_path):
    result = CliRunner().invoke(cli, ["freeze", "--out", str(tmp_path)])

    assert result.exit_code == 2
    assert "--profile" in result.output


def run_frozen(executable: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a frozen edge-runtime under ``env -i``: no PATH, no VIRTUAL_ENV, no PYTHONPATH, so
    the executable must carry everything."""
    return subprocess.run(
        ["env", "-i", str(executable), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


@pytest.mark.slow
@pytest.mark.skipif(not X86, reason="freezes for an x86-64 profile")
def test_one_file_runtime_passes_selftest_with_no_python_on_path(cnn_bundle, keypair, tmp_path):
    (frozen,) = freeze_runtime(
        load_profile("x86-64-avx2"), ["onnx"], tmp_path / "frozen", forms=("onefile",)
    )

    done = run_frozen(
        frozen.executable, "selftest", str(cnn_bundle), "--pubkey", str(keypair[1]), cwd=tmp_path
    )

    assert done.returncode == 0, done.stderr
    assert "self-test PASS" in done.stdout
    assert frozen.size_bytes < 150 * 2**20  # onnxruntime, numpy and Python; no torch, no packager
    assert not list(Path(tmp_path / "frozen" / "onefile").glob("*.so"))  # one file, nothing beside


@pytest.mark.slow
@pytest.mark.skipif(not X86, reason="freezes for an x86-64 profile")
def test_one_folder_tflite_runtime_passes_selftest(tflite_x86_bundle, keypair, tmp_path):
    (frozen,) = freeze_runtime(
        load_profile("x86-64-avx2"), ["tflite"], tmp_path / "frozen", forms=("onedir",)
    )
    key = ("--pubkey", str(keypair[1]))

    loaded = run_frozen(
        frozen.executable, "info", str(tflite_x86_bundle), *key, "--load", cwd=tmp_path
    )
    checked = run_frozen(frozen.executable, "selftest", str(tflite_x86_bundle), *key, cwd=tmp_path)

    assert loaded.returncode == 0, loaded.stderr
    assert '"interpreter": "ai_edge_litert 2.' in loaded.stdout
    assert checked.returncode == 0, checked.stderr
    assert "self-test PASS" in checked.stdout
    internal = frozen.executable.parent / "_internal"
    assert not (internal / "onnxruntime").exists() and not (internal / "torch").exists()
