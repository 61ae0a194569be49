"""MiniLM (real weights, real sentences) packaged for every shipped profile, then verified,
self-tested and run through the device runtime against the fp32 reference."""

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime import Runtime
from edge_runtime.bundle import verify_bundle
from edge_runtime.selftest import cosine_rows
from packager.profiles import shipped_profile_names
from tests.conftest import build_example

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def minilm_bundles(minilm_example, keypair, tmp_path_factory):
    """Builds on first use, once per profile per test session."""
    folder = tmp_path_factory.mktemp("minilm-bundles")
    built = {}

    def get(profile: str):
        if profile not in built:
            output = folder / f"minilm-{profile}.edgepkg"
            built[profile] = build_example(minilm_example, keypair[0], output, profile)
        return built[profile]

    return get


@pytest.fixture(scope="session")
def minilm_reference(minilm_example):
    with np.load(minilm_example.eval) as data:
        inputs = {key: data[key] for key in data.files}
    session = ort.InferenceSession(str(minilm_example.model), providers=["CPUExecutionProvider"])
    return inputs, session.run(None, inputs)[0]


@pytest.mark.parametrize("profile", shipped_profile_names())
def test_minilm_bundle_verifies_selftests_and_matches_fp32(
    profile, minilm_bundles, minilm_reference, keypair
):
    result = minilm_bundles(profile)
    inputs, reference = minilm_reference

    verified = verify_bundle(result.bundle, keypair[1])
    with Runtime.open(result.bundle, keypair[1]) as runtime:
        report = runtime.selftest()
        embeddings = runtime.run(inputs)["sentence_embedding"]

    manifest = verified.manifest
    assert manifest.target.profile == profile
    assert report.passed, report.failures
    # All held-out sentences at once (batch 56), not one at a time as the packager ran them.
    assert embeddings.shape == reference.shape == (len(inputs["input_ids"]), 384)
    # The self-test bounds how far another CPU may compute this model (its reference is
    # the bundled model's own outputs), not its distance to fp32: that is the gate's.
    assert cosine_rows(embeddings, reference).mean() >= 0.99
    if manifest.backend.providers[0] == "CPUExecutionProvider":
        # CPU profiles get int8: static QDQ is tried first and fails the gate on MiniLM.
        assert manifest.model.precision == "int8"
        assert manifest.quantization.attempts[0].status == "failed"
    else:
        assert manifest.model.recipe == "fp16"


def test_minilm_no_measure_builds_are_byte_identical(
    minilm_bundles, minilm_example, keypair, tmp_path
):
    first = minilm_bundles("raspberry-pi-4")

    second = build_example(minilm_example, keypair[0], tmp_path / "again.edgepkg", "raspberry-pi-4")

    assert first.bundle.read_bytes() == second.bundle.read_bytes()
