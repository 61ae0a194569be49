"""The self-test bounds against a real other CPU: the digits CNN (static int8, QDQ) for
raspberry-pi-4, installed offline and self-tested on emulated arm64 (cortex-a72, as a Pi 4).

ONNX Runtime's fused u8s8 kernels on an x86 AVX2 build host saturate 16-bit pair sums;
ARM sums exactly, as the build host's second kernel path (graph fusions off) does. So the
Pi computes what that path computed, which the bundle keeps as an alternate reference.
Measured: the Pi's logits equal the unfused path's, 3.9 (13% of the range) from the
host's; against the host's reference alone, the int8 margin (1.5) would fail every Pi.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime.manifest import parse_manifest
from edge_runtime.selftest import check_output
from tests.conftest import build_example
from tests.integration.test_arm64 import rootfs, run_inside  # noqa: F401  (rootfs: a fixture)

pytestmark = [pytest.mark.arm64, pytest.mark.slow]


def unfused(model: bytes, images: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"image": row[None]})[0] for row in images])


def test_a_pi_lands_where_the_kernel_check_did_and_within_the_bound(
    rootfs,  # noqa: F811
    digits_example,
    keypair,
    tmp_path,
):
    folder = tmp_path / "device"
    folder.mkdir()
    bundle = folder / "digits-pi4.edgepkg"
    build_example(digits_example, keypair[0], bundle, "raspberry-pi-4", with_wheels=True)
    shutil.copy(keypair[1], folder / "edgepack.pub")
    with tarfile.open(bundle) as archive:
        members = {info.name: archive.extractfile(info).read() for info in archive.getmembers()}
    spec = parse_manifest(members["manifest.json"]).selftest
    with np.load(io.BytesIO(members["selftest/vectors.npz"])) as vectors:
        images, reference = vectors["input.image"], vectors["reference.logits"]
        alternate = vectors.get("alternate.logits")
    np.savez(folder / "in.npz", image=images)
    wheels, pubkey = folder / "digits-pi4.wheels", folder / "edgepack.pub"

    done = run_inside(
        folder,
        f"""
        bash {wheels}/install.sh {bundle} --pubkey {pubkey} --venv /tmp/venv
        /tmp/venv/bin/edge-runtime selftest {bundle} --pubkey {pubkey} --json > {folder}/st.json
        /tmp/venv/bin/edge-runtime run {bundle} --pubkey {pubkey} \\
            --input {folder}/in.npz --output {folder}/out.npz
        """,
    )

    assert done.returncode == 0, f"inside the emulated system:\n{done.stdout}\n{done.stderr}"
    report = json.loads((folder / "st.json").read_text())
    assert report["passed"], report["failures"]
    bound = spec.bound("logits")
    pi = np.load(folder / "out.npz")["logits"]
    # The Pi sums exactly, as the unfused path on the build host does, and lands on the
    # alternate reference the bundle keeps for it, within the int8 margin.
    assert np.abs(pi - unfused(members["model/model.onnx"], images)).max() <= 0.01 * bound.scale
    assert np.abs(pi - reference).max() <= 1.01 * bound.kernel_spread + 0.01 * bound.scale
    for index in range(spec.count):
        row = slice(index, index + 1)
        other = None if alternate is None else alternate[row]
        check = check_output(pi[row].astype(np.float64), reference[row], bound, other)
        assert check.failure is None, check.failure
