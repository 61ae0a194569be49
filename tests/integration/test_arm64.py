"""raspberry-pi-4 bundles (MiniLM on ONNX Runtime, the digits CNN on LiteRT), installed
offline and run on an emulated Raspberry Pi OS.

Debian bookworm arm64 (the base of Raspberry Pi OS bookworm, same CPython 3.11) runs under
qemu user-mode emulation in a chroot with no network (``scripts/arm64-rootfs.sh``). Inside
it, ``install.sh`` installs the runtime from the bundle's own wheelhouse; ``edge-runtime
selftest`` and ``edge-runtime run`` must then reproduce what the host computes.

The root file system is built once (about 10 minutes) and cached outside the checkout, in
``~/.cache/edgepack/arm64-rootfs``; later runs reuse it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.runtime import Runtime
from edge_runtime.selftest import check_output
from packager.formats import get_format
from tests.conftest import REPO, build_example

pytestmark = [pytest.mark.arm64, pytest.mark.slow]
ROOTFS = REPO / "scripts" / "arm64-rootfs.sh"


def _emulation_available() -> str | None:
    """Why this machine cannot run the emulated system, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (chroot, mounts, binfmt_misc)"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    return None


@pytest.fixture(scope="module")
def rootfs() -> Path:
    reason = _emulation_available()
    if reason:
        pytest.skip(f"emulated arm64 system unavailable: {reason}")
    made = subprocess.run([str(ROOTFS), "create"], capture_output=True, text=True, timeout=1800)
    assert made.returncode == 0, f"scripts/arm64-rootfs.sh create failed:\n{made.stderr[-3000:]}"
    return Path(subprocess.check_output([str(ROOTFS), "path"], text=True).strip())


@pytest.fixture(scope="module")
def pi4_bundle_with_wheels(minilm_example, keypair, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("arm64") / "minilm-pi4.edgepkg"
    build_example(minilm_example, keypair[0], output, "raspberry-pi-4", with_wheels=True)
    return output


@pytest.fixture(scope="module")
def tflite_pi4_bundle_with_wheels(digits_tflite_example, keypair, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("arm64") / "digits-tflite-pi4.edgepkg"
    build_example(digits_tflite_example, keypair[0], output, "raspberry-pi-4", with_wheels=True)
    return output


def run_inside(folder: Path, script: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run ``script`` with sh in the emulated system, with ``folder`` visible at its path."""
    return subprocess.run(
        [str(ROOTFS), "run", "--", "sh", "-ec", script],
        env={**os.environ, "ARM64_BIND": str(folder)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "bundle_fixture, example_fixture, engine",
    [
        pytest.param("pi4_bundle_with_wheels", "minilm_example", "onnxruntime", id="onnx"),
        pytest.param(
            "tflite_pi4_bundle_with_wheels", "digits_tflite_example", "ai_edge_litert", id="tflite"
        ),
    ],
)
def test_offline_install_selftest_and_run_match_the_host(
    request, rootfs, bundle_fixture, example_fixture, engine, keypair
):
    bundle = request.getfixturevalue(bundle_fixture)
    example = request.getfixturevalue(example_fixture)
    folder = bundle.parent
    pubkey = folder / "edgepack.pub"
    shutil.copy(keypair[1], pubkey)
    with np.load(example.eval) as data:
        inputs = {key: data[key][:1] for key in data.files if key != "labels"}
    np.savez(folder / "in.npz", **inputs)
    with Runtime.open(bundle, keypair[1]) as runtime:
        expected = runtime.run(inputs)
        tolerance = runtime.manifest.selftest
        # A CPU that sums exactly computes as the host's second kernel path does (an x86
        # AVX2 host's int8 kernels saturate): the device may match either, as in selftest.
        manifest = runtime.manifest
        second = get_format(manifest.model.format).kernel_check(
            runtime.model_dir / manifest.model.path
        )
        alternate = second.run(inputs)
    wheels = folder / f"{bundle.stem}.wheels"

    done = run_inside(
        folder,
        f"""
        uname -m
        python3 -c 'import socket; socket.create_connection(("1.1.1.1", 443), 2)' \\
            2>/dev/null && echo NETWORK-UP || echo no-network
        bash {wheels}/install.sh {bundle} --pubkey {pubkey} --venv /tmp/venv
        /tmp/venv/bin/python -c 'import {engine}; print("engine", {engine}.__name__)'
        /tmp/venv/bin/edge-runtime selftest {bundle} --pubkey {pubkey}
        /tmp/venv/bin/edge-runtime run {bundle} --pubkey {pubkey} \\
            --input {folder}/in.npz --output {folder}/out-arm64.npz
        """,
    )

    assert done.returncode == 0, f"inside the emulated system:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.splitlines()[0] == "aarch64"
    assert "no-network" in done.stdout and "NETWORK-UP" not in done.stdout
    assert "wheels match the manifest's sha256 (manylinux_2_28_aarch64" in done.stdout
    assert "self-test PASS" in done.stdout
    assert f"engine {engine}" in done.stdout
    with np.load(folder / "out-arm64.npz") as produced:
        for name, reference in expected.items():
            actual = produced[name]
            assert actual.shape == reference.shape
            bound, other = tolerance.bound(name), alternate[name].astype(np.float64)
            check = check_output(actual.astype(np.float64), reference, bound, other)
            assert check.failure is None, check.failure


def test_a_tampered_wheel_is_refused_before_anything_is_installed(
    rootfs, pi4_bundle_with_wheels, keypair, tmp_path
):
    folder = tmp_path / "device"
    shutil.copytree(pi4_bundle_with_wheels.parent, folder)
    bundle = folder / pi4_bundle_with_wheels.name
    wheels = folder / "minilm-pi4.wheels"
    victim = next(wheels.glob("click-*.whl"))
    victim.write_bytes(victim.read_bytes() + b"\0")
    shutil.copy(keypair[1], folder / "edgepack.pub")

    done = run_inside(
        folder,
        f"""
        bash {wheels}/install.sh {bundle} --pubkey {folder}/edgepack.pub --venv /tmp/venv \\
            || echo "exit $?"
        test -e /tmp/venv && echo VENV-CREATED || echo no-venv
        """,
        timeout=300,
    )

    assert "does not match the sha256 in the signed manifest" in done.stderr
    assert "exit 1" in done.stdout and "no-venv" in done.stdout
