"""Tests for edge_runtime/runtime.py (the ``Runtime`` facade) and edge_runtime/selftest.py."""

from __future__ import annotations

import io
import re
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.backends import create_backend
from edge_runtime.bundle import verify_bundle
from edge_runtime.errors import BackendError, InputSignatureError, TrustError
from edge_runtime.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    TensorSpec,
    TfliteBackendSpec,
    parse_manifest,
)
from edge_runtime.runtime import InputChecker, Runtime, check_inputs
from edge_runtime.selftest import cosine_rows, load_vectors, run_selftest
from edge_runtime.signing import key_id, load_public_key
from packager.keys import load_private_key

IMAGE_SIGNATURE = "expected image: float32[batch, 1, 8, 8]"


@pytest.fixture
def runtime(cnn_bundle, keypair):
    with Runtime.open(cnn_bundle, keypair[1]) as opened:
        yield opened


@pytest.fixture
def vectors(runtime) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The bundle's own self-test inputs and reference outputs (the bundled model's)."""
    return load_vectors(runtime.model_dir / runtime.manifest.selftest.path)


def resign(bundle: Path, private_key: Path, output: Path, **manifest_changes) -> Path:
    """Copy ``bundle`` with a changed manifest, validly signed with ``private_key``."""
    with tarfile.open(bundle, mode="r:") as archive:
        files = {info.name: archive.extractfile(info).read() for info in archive.getmembers()}
    manifest = parse_manifest(files[MANIFEST_NAME]).model_copy(update=manifest_changes)
    files[MANIFEST_NAME] = manifest.to_bytes()
    files[SIGNATURE_NAME] = load_private_key(private_key).sign(files[MANIFEST_NAME])
    with tarfile.open(output, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return output


def test_run_matches_the_fp32_reference_within_the_selftest_tolerance(runtime, vectors):
    inputs, references = vectors
    tolerance = runtime.manifest.selftest

    outputs = runtime.run(inputs)

    assert set(outputs) == {"logits"}
    assert outputs["logits"].shape == references["logits"].shape
    assert outputs["logits"].dtype == np.float32
    assert np.max(np.abs(outputs["logits"] - references["logits"])) <= tolerance.atol
    assert cosine_rows(outputs["logits"], references["logits"]).min() >= tolerance.min_cosine


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_run_accepts_any_size_for_a_named_dimension(runtime, batch):
    image = np.zeros((batch, 1, 8, 8), dtype=np.float32)

    outputs = runtime.run({"image": image})

    assert outputs["logits"].shape == (batch, 10)


IMAGE = np.zeros((2, 1, 8, 8), dtype=np.float32)


@pytest.mark.parametrize(
    ("inputs", "phrase"),
    [
        pytest.param(
            {"img": IMAGE}, "missing inputs ['image'], unknown inputs ['img']", id="wrong-name"
        ),
        pytest.param(
            {"image": IMAGE, "labels": np.zeros(2, dtype=np.int64)},
            "missing inputs [], unknown inputs ['labels']",
            id="extra-name",
        ),
        pytest.param({}, "missing inputs ['image']", id="no-inputs"),
        pytest.param(
            {"image": IMAGE.astype(np.float64)}, "has dtype float64, needs float32", id="float64"
        ),
        pytest.param({"image": IMAGE.astype(np.int64)}, "has dtype int64", id="int64"),
        pytest.param({"image": IMAGE.astype(object)}, "has dtype object", id="object-array"),
        pytest.param(
            {"image": IMAGE[0]}, "has rank 3 (shape [1, 8, 8]), needs rank 4", id="rank-3"
        ),
        pytest.param({"image": IMAGE[None]}, "has rank 5", id="rank-5"),
        pytest.param(
            {"image": np.zeros((2, 1, 8, 9), dtype=np.float32)},
            "has size 9 on axis 3, needs 8",
            id="wrong-fixed-dim",
        ),
        pytest.param(
            {"image": np.zeros((2, 3, 8, 8), dtype=np.float32)},
            "has size 3 on axis 1, needs 1",
            id="wrong-channels",
        ),
        pytest.param({"image": IMAGE.tolist()}, "is a list, not a numpy array", id="list"),
        pytest.param({"image": 0.5}, "is a float, not a numpy array", id="python-scalar"),
        pytest.param({"image": np.float32(0.5)}, "not a numpy array", id="numpy-scalar"),
        pytest.param(IMAGE, "inputs must be a dict of name -> numpy array", id="bare-array"),
        pytest.param([("image", IMAGE)], "inputs must be a dict", id="list-of-pairs"),
    ],
)
def test_run_refuses_inputs_that_do_not_match_the_signature(runtime, inputs, phrase):
    with pytest.raises(InputSignatureError) as caught:
        runtime.run(inputs)

    assert phrase in str(caught.value)
    assert IMAGE_SIGNATURE in str(caught.value)


PAIR = [
    TensorSpec(name="tokens", dtype="int64", shape=["batch", "sequence"]),
    TensorSpec(name="mask", dtype="int64", shape=["batch", "sequence"]),
]
PAIR_SIGNATURE = "expected tokens: int64[batch, sequence], mask: int64[batch, sequence]"


@pytest.mark.parametrize(
    ("mask_shape", "phrase"),
    [
        pytest.param((3, 7), "input 'mask' has batch=3 but another input has batch=2", id="batch"),
        pytest.param((2, 5), "has sequence=5 but another input has sequence=7", id="sequence"),
    ],
)
def test_check_inputs_refuses_a_named_dimension_that_differs_across_inputs(mask_shape, phrase):
    inputs = {
        "tokens": np.zeros((2, 7), dtype=np.int64),
        "mask": np.zeros(mask_shape, dtype=np.int64),
    }

    with pytest.raises(InputSignatureError, match=re.escape(phrase)) as caught:
        check_inputs(PAIR, inputs)

    assert PAIR_SIGNATURE in str(caught.value)


@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (9, 128)])
def test_check_inputs_accepts_a_named_dimension_used_consistently(shape):
    inputs = {name: np.zeros(shape, dtype=np.int64) for name in ("tokens", "mask")}

    assert check_inputs(PAIR, inputs) is None


def test_check_inputs_refuses_a_named_dimension_that_differs_within_one_input():
    specs = [TensorSpec(name="square", dtype="float32", shape=["n", "n"])]

    with pytest.raises(InputSignatureError, match="has n=3 but another of its axes has n=2"):
        check_inputs(specs, {"square": np.zeros((2, 3), dtype=np.float32)})


@pytest.mark.parametrize("unknown", ["?", ""])
def test_check_inputs_takes_each_unknown_axis_on_its_own(unknown):
    """Bundles built before '?' axes got names of their own: each '?' is free by itself."""
    specs = [TensorSpec(name="image", dtype="float32", shape=["n", 3, unknown, unknown])]

    assert check_inputs(specs, {"image": np.zeros((1, 3, 48, 192), dtype=np.float32)}) is None
    with pytest.raises(InputSignatureError, match="rank 3"):
        check_inputs(specs, {"image": np.zeros((3, 48, 192), dtype=np.float32)})


def test_selftest_passes_on_the_real_bundle(runtime):
    spec = runtime.manifest.selftest

    report = runtime.selftest()

    assert report.passed
    assert report.failures == []
    assert report.vectors == spec.count == 8
    assert 0 <= report.max_abs_error <= spec.atol
    assert spec.min_cosine <= report.min_cosine <= 1.0
    assert (report.atol, report.required_cosine) == (spec.atol, spec.min_cosine)


@pytest.mark.parametrize(
    ("corrupt", "phrase"),
    [
        pytest.param(lambda ref: -ref, "cosine -1.000000", id="negated-reference"),
        pytest.param(lambda ref: ref + 1000.0, "max abs error 1e+03", id="shifted-reference"),
    ],
)
def test_selftest_fails_when_the_device_disagrees_with_the_reference(
    runtime, vectors, corrupt, phrase, tmp_path
):
    inputs, references = vectors
    stored = {f"input.{name}": value for name, value in inputs.items()}
    stored.update({f"reference.{name}": corrupt(value) for name, value in references.items()})
    np.savez(tmp_path / "vectors.npz", **stored)
    manifest = runtime.manifest.model_copy(
        update={"selftest": runtime.manifest.selftest.model_copy(update={"path": "vectors.npz"})}
    )

    report = run_selftest(runtime, tmp_path, manifest)

    assert not report.passed
    assert len(report.failures) == manifest.selftest.count
    assert report.failures[0].startswith("vector 0 output logits: ")
    assert phrase in report.failures[0]


def selftest_with_references(runtime, references, tmp_path, **spec_changes):
    """run_selftest on the bundle's own inputs with ``references`` stored instead."""
    inputs, _ = load_vectors(runtime.model_dir / runtime.manifest.selftest.path)
    stored = {f"input.{name}": value for name, value in inputs.items()}
    stored.update({f"reference.{name}": value for name, value in references.items()})
    np.savez(tmp_path / "vectors.npz", **stored)
    spec = runtime.manifest.selftest.model_copy(update={"path": "vectors.npz", **spec_changes})
    return run_selftest(runtime, tmp_path, runtime.manifest.model_copy(update={"selftest": spec}))


@pytest.mark.parametrize(("factor", "passed"), [(0.9, True), (1.2, False)])
def test_the_device_is_held_to_each_outputs_own_bound(runtime, vectors, factor, passed, tmp_path):
    """A device whose outputs moved by ``factor`` times the bound on one element."""
    _, references = vectors
    bound = runtime.manifest.selftest.bound("logits")
    expected = references["logits"].astype(np.float64)
    moved = expected.copy()
    moved[:, 3] += factor * (bound.atol + bound.rtol * np.abs(expected[:, 3]))
    # The device computes ``expected``; a reference ``moved`` away is the same distance.
    # The cosine check is left out here: one element moved that far turns the vector.
    elementwise = {"logits": bound.model_copy(update={"min_cosine": -1.0})}
    report = selftest_with_references(
        runtime, {"logits": moved.astype(np.float32)}, tmp_path, outputs=elementwise
    )

    assert report.passed is passed
    assert len(report.failures) == (0 if passed else runtime.manifest.selftest.count)
    if not passed:
        assert "(at element 3: " in report.failures[0]
        assert f"atol {bound.atol:.3g} + rtol {bound.rtol:g} x |reference|" in report.failures[0]


def test_a_selftest_spec_without_per_output_bounds_uses_its_one_atol(runtime, vectors, tmp_path):
    """Bundles before per-output bounds: one atol and min_cosine for every output."""
    _, references = vectors
    shifted = {"logits": references["logits"] + np.float32(0.5)}

    loose = selftest_with_references(
        runtime, shifted, tmp_path, outputs={}, reference="source", atol=0.6, min_cosine=0.9
    )
    tight = selftest_with_references(
        runtime, shifted, tmp_path, outputs={}, reference="source", atol=0.4, min_cosine=0.9
    )

    assert loose.passed and (loose.atol, loose.required_cosine) == (0.6, 0.9)
    assert not tight.passed
    assert "allowed 0.4 = atol 0.4 + rtol 0 x |reference|" in tight.failures[0]


@pytest.mark.parametrize(
    ("actual", "expected", "cosine"),
    [
        pytest.param([[1.0, 2.0]], [[2.0, 4.0]], 1.0, id="parallel"),
        pytest.param([[1.0, 0.0]], [[0.0, 3.0]], 0.0, id="orthogonal"),
        pytest.param([[1.0, 2.0]], [[-1.0, -2.0]], -1.0, id="opposite"),
        pytest.param([[0.0, 0.0]], [[0.0, 0.0]], 1.0, id="both-zero"),
    ],
)
def test_cosine_rows(actual, expected, cosine):
    result = cosine_rows(np.array(actual), np.array(expected))

    np.testing.assert_allclose(result, [cosine])


def test_info_shows_the_manifest_summary_and_the_providers_in_use(runtime, keypair):
    facts = runtime.info()

    assert facts["providers"] == ["CPUExecutionProvider"]
    assert facts["name"] == "digits-cnn"
    assert facts["profile"] == "x86-64-avx2"
    assert facts["backend"] == "onnx"
    assert facts["recipe"] == runtime.manifest.model.recipe
    assert facts["bundle_id"] == runtime.manifest.bundle_id
    assert facts["signed_by"] == runtime.signed_by == key_id(load_public_key(keypair[1]))


def test_close_removes_the_temporary_extraction_folder(cnn_bundle, keypair, tmp_path):
    runtime = Runtime.open(cnn_bundle, keypair[1])
    model_dir = runtime.model_dir
    assert (model_dir / "model" / "model.onnx").is_file()
    assert model_dir.parent == (tmp_path / "tmp").resolve()

    runtime.close()

    assert not model_dir.exists()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_leaving_the_context_removes_the_temporary_extraction_folder(cnn_bundle, keypair, tmp_path):
    with Runtime.open(cnn_bundle, keypair[1]) as runtime:
        model_dir = runtime.model_dir

    assert not model_dir.exists()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_close_keeps_a_folder_the_caller_chose(cnn_bundle, keypair, tmp_path):
    target = tmp_path / "models" / "digits"
    runtime = Runtime.open(cnn_bundle, keypair[1], extract_dir=target)

    runtime.close()

    assert runtime.model_dir == target.resolve()
    assert (target / "model" / "model.onnx").is_file()
    assert (target / MANIFEST_NAME).is_file()


def test_run_after_close_raises_backend_error(cnn_bundle, keypair):
    runtime = Runtime.open(cnn_bundle, keypair[1])
    runtime.close()

    with pytest.raises(BackendError, match="closed"):
        runtime.run({"image": IMAGE})


def test_open_without_any_key_raises_trust_error(cnn_bundle, tmp_path):
    with pytest.raises(TrustError, match="no public key to verify the bundle"):
        Runtime.open(cnn_bundle)

    assert list((tmp_path / "tmp").iterdir()) == []


def test_open_with_trusted_keys_from_the_environment(cnn_bundle, keypair, monkeypatch):
    monkeypatch.setenv("EDGEPACK_TRUSTED_KEYS", str(keypair[1].parent))

    with Runtime.open(cnn_bundle) as runtime:
        report = runtime.selftest()

    assert report.passed


@pytest.mark.parametrize("name", ["openvino", "tensorrt"])
def test_create_backend_refuses_an_unknown_name(name):
    with pytest.raises(BackendError) as caught:
        create_backend(name)

    assert f"bundle needs backend {name!r}" in str(caught.value)
    assert "available: llamacpp, onnx, tflite" in str(caught.value)


def test_open_refuses_a_model_the_named_backend_cannot_read(cnn_bundle, keypair, tmp_path):
    """A validly signed manifest that calls an ONNX file TFLite, for the TFLite backend."""
    manifest = verify_bundle(cnn_bundle, keypair[1]).manifest
    bundle = resign(
        cnn_bundle,
        keypair[0],
        tmp_path / "tflite.edgepkg",
        model=manifest.model.model_copy(update={"format": "tflite", "opset": None}),
        backend=TfliteBackendSpec(intra_op_threads=1),
    )

    with pytest.raises(BackendError, match="refusing to load model/model.onnx: .*probably ONNX"):
        Runtime.open(bundle, keypair[1])

    assert list((tmp_path / "tmp").iterdir()) == []


FIXED = [
    TensorSpec(name="image", dtype="float32", shape=[1, 1, 8, 8]),
    TensorSpec(name="scale", dtype="int32", shape=[1]),
]
GOOD = {"image": np.zeros((1, 1, 8, 8), np.float32), "scale": np.ones(1, np.int32)}


class _Wrapped(np.ndarray):
    pass


@pytest.mark.parametrize(
    "inputs",
    [
        pytest.param(GOOD, id="plain"),
        pytest.param({**GOOD, "image": GOOD["image"].view(_Wrapped)}, id="ndarray-subclass"),
        pytest.param(types.MappingProxyType(GOOD), id="read-only-mapping"),
    ],
)
def test_input_checker_accepts_what_check_inputs_accepts(inputs):
    assert check_inputs(FIXED, inputs) is None
    assert InputChecker(FIXED)(inputs) is None


@pytest.mark.parametrize(
    "inputs",
    [
        pytest.param({"image": GOOD["image"]}, id="missing"),
        pytest.param({**GOOD, "extra": GOOD["scale"]}, id="extra"),
        pytest.param({**GOOD, "scale": np.ones(1, np.int64)}, id="dtype"),
        pytest.param({**GOOD, "image": np.zeros((2, 1, 8, 8), np.float32)}, id="batch"),
        pytest.param({**GOOD, "scale": [1]}, id="list"),
        pytest.param(list(GOOD.items()), id="not-a-mapping"),
    ],
)
def test_input_checker_refuses_with_the_same_message(inputs):
    with pytest.raises(InputSignatureError) as direct:
        check_inputs(FIXED, inputs)
    with pytest.raises(InputSignatureError) as checked:
        InputChecker(FIXED)(inputs)
    assert str(checked.value) == str(direct.value)
    assert "expected image: float32[1, 1, 8, 8], scale: int32[1]" in str(checked.value)
