"""TFLite bundles end to end: the digits CNN converted by litert-torch, quantized by
ai-edge-quantizer, gated, signed, then verified, self-tested and run by the runtime.

The source of truth for "matches the source model" is the float .tflite run in the same
interpreter, and, one step further back, the same trained network exported to ONNX.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edge_runtime import Runtime
from edge_runtime.bundle import verify_bundle
from packager.build import BuildConfig, build_bundle
from packager.cli import cli
from packager.errors import DataError, GateError, ModelValidationError, PackagerError
from packager.profiles import load_profile
from tests.numerics import assert_close_across_kernels
from tests.packager.test_cli import edgepack

BUNDLES = [
    pytest.param("raspberry-pi-4", "tflite_pi4_bundle", id="raspberry-pi-4"),
    pytest.param("x86-64-avx2", "tflite_x86_bundle", id="x86-64-avx2"),
]


def _eval(example, count: int | None = None):
    with np.load(example.eval) as data:
        images, labels = data["image"], data["labels"]
    return (images, labels) if count is None else (images[:count], labels[:count])


def _config(example, key, output, profile="x86-64-avx2", **options) -> BuildConfig:
    options.setdefault("measure", False)
    return BuildConfig(
        model=options.pop("model", example.model),
        profile=load_profile(profile),
        key=key,
        output=output,
        calibration=options.pop("calibration", example.calibration),
        eval=options.pop("eval", example.eval),
        **options,
    )


def _run_all(runtime: Runtime, images: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [runtime.run({"image": images[i : i + 1]})["logits"] for i in range(len(images))]
    )


def _source_logits(example, images: np.ndarray) -> np.ndarray:
    """The unquantized .tflite, in the interpreter the runtime uses."""
    from edge_runtime.backends.tflite import TfliteSession

    session = TfliteSession(example.model, 2)
    return np.concatenate(
        [session.run({"image": images[i : i + 1]})["logits"] for i in range(len(images))]
    )


@pytest.mark.parametrize("profile, bundle_fixture", BUNDLES)
def test_bundle_verifies_selftests_and_matches_the_source(
    request, profile, bundle_fixture, digits_tflite_example, keypair
):
    bundle = request.getfixturevalue(bundle_fixture)
    verified = verify_bundle(bundle, keypair[1])
    manifest = verified.manifest
    spec = load_profile(profile).tflite

    assert manifest.target.profile == profile
    assert manifest.backend.name == "tflite"
    assert manifest.backend.intra_op_threads == spec.threads
    assert manifest.backend.xnnpack is True
    assert manifest.model.format == "tflite"
    assert manifest.model.path == "model/model.tflite"
    assert manifest.model.signature == "serving_default"
    assert [t.model_dump() for t in manifest.inputs] == [
        {"name": "image", "dtype": "float32", "shape": [1, 1, 8, 8]}
    ]
    assert [t.model_dump() for t in manifest.outputs] == [
        {"name": "logits", "dtype": "float32", "shape": [1, 10]}
    ]
    # With calibration data the first recipe, full int8, passes the 1% gate.
    assert manifest.model.recipe == "int8-static"
    assert manifest.model.precision == "int8"
    assert [a.recipe for a in manifest.quantization.attempts] == ["int8-static"]
    assert manifest.tools["ai-edge-quantizer"] != "not installed"
    steps = manifest.steps
    assert [(step.name, step.config) for step in steps] == [
        ("TfliteValidate", {}),
        ("TfliteQuantize", {"mode": "int8-static", "calibration": "min-max"}),
    ]
    assert steps[0].output_sha256 is None
    assert steps[1].output_sha256 == manifest.file("model/model.tflite").sha256

    images, labels = _eval(digits_tflite_example)
    with Runtime.open(bundle, keypair[1]) as runtime:
        report = runtime.selftest()
        assert report.passed, report.failures
        assert report.vectors == manifest.selftest.count
        info = runtime.info()
        assert info["backend"] == "tflite"
        assert info["interpreter"].startswith("ai_edge_litert ")
        assert info["xnnpack"] is True
        logits = _run_all(runtime, images)

    reference = _source_logits(digits_tflite_example, images)
    agreement = float((logits.argmax(1) == reference.argmax(1)).mean())
    assert agreement >= 0.99
    assert float((logits.argmax(1) == labels).mean()) >= 0.9
    cosine = (logits * reference).sum(1) / np.linalg.norm(logits, axis=1)
    cosine /= np.linalg.norm(reference, axis=1)
    assert cosine.mean() > 0.995
    # The runtime reproduces what the gate measured for this model on the build host.
    gate = manifest.quantization.attempts[0].metrics
    assert gate["top1_agreement"] == pytest.approx(agreement, abs=1e-6)
    assert gate["max_abs_error"] == pytest.approx(np.abs(logits - reference).max(), rel=1e-3)
    assert gate["cosine_mean"] == pytest.approx(cosine.mean(), abs=1e-5)


def test_source_tflite_matches_the_onnx_export(digits_tflite_example, digits_example):
    """Both files come from the same trained network: the converters agree to float noise."""
    import onnxruntime as ort

    images, _ = _eval(digits_tflite_example, 64)
    session = ort.InferenceSession(str(digits_example.model), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(["logits"], {"image": images})[0]
    assert_close_across_kernels(_source_logits(digits_tflite_example, images), onnx_logits)


def test_dynamic_and_fp16_recipes_and_sizes(digits_tflite_example, keypair, tmp_path):
    sizes = {}
    for recipe, precision in [("int8-dynamic", "int8"), ("fp16", "fp16"), ("as-is", "fp32")]:
        output = tmp_path / f"{recipe}.edgepkg"
        result = build_bundle(_config(digits_tflite_example, keypair[0], output, recipe=recipe))
        manifest = result.manifest
        assert manifest.model.recipe == recipe
        assert manifest.model.precision == precision
        sizes[recipe] = manifest.file("model/model.tflite").size
        with Runtime.open(output, keypair[1]) as runtime:
            assert runtime.selftest().passed
    source = digits_tflite_example.model.stat().st_size
    assert sizes["as-is"] == source
    # float16 weights halve the file; int8 weights quarter it (plus scales and graph)
    assert sizes["fp16"] < 0.6 * source
    assert sizes["int8-dynamic"] < 0.35 * source


def test_a_failed_gate_falls_back_along_the_chain(digits_tflite_example, keypair, tmp_path):
    """At 1e-6 of cosine distance both int8 recipes fail; fp16 weights pass (about 1e-9)."""
    output = tmp_path / "strict.edgepkg"
    result = build_bundle(
        _config(digits_tflite_example, keypair[0], output, max_degradation=1e-6, task="generic")
    )
    attempts = result.manifest.quantization.attempts
    assert [(a.recipe, a.status) for a in attempts] == [
        ("int8-static", "failed"),
        ("int8-dynamic", "failed"),
        ("fp16", "passed"),
    ]
    assert all(a.reason.startswith("degradation ") for a in attempts[:2])
    assert attempts[0].metrics["degradation"] > attempts[1].metrics["degradation"] > 1e-6
    assert result.manifest.model.precision == "fp16"
    assert result.manifest.quantization.gate_metric == "1 - cosine_mean"


def test_no_calibration_skips_static_int8(digits_tflite_example, keypair, tmp_path):
    output = tmp_path / "nocal.edgepkg"
    result = build_bundle(_config(digits_tflite_example, keypair[0], output, calibration=None))
    first, second = result.manifest.quantization.attempts[:2]
    assert (first.recipe, first.status, first.reason) == (
        "int8-static",
        "skipped",
        "needs --calibration FILE.npz",
    )
    assert (second.recipe, second.status) == ("int8-dynamic", "passed")


def test_an_already_quantized_source_is_bundled_as_it_is(
    tflite_x86_bundle, digits_tflite_example, keypair, tmp_path
):
    quantized = tmp_path / "digits-int8.tflite"
    with Runtime.open(tflite_x86_bundle, keypair[1]) as runtime:
        quantized.write_bytes((runtime.model_dir / "model/model.tflite").read_bytes())
    output = tmp_path / "requant.edgepkg"
    result = build_bundle(_config(digits_tflite_example, keypair[0], output, model=quantized))
    manifest = result.manifest
    attempts = manifest.quantization.attempts
    assert [(a.recipe, a.status) for a in attempts] == [
        ("int8-static", "skipped"),
        ("int8-dynamic", "skipped"),
        ("fp16", "skipped"),
        ("as-is", "passed"),
    ]
    assert "already int8" in attempts[0].reason
    assert manifest.model.precision == "int8"
    assert manifest.file("model/model.tflite").size == quantized.stat().st_size


def test_without_ai_edge_quantizer_the_model_is_bundled_as_it_is(
    digits_tflite_example, keypair, tmp_path, monkeypatch
):
    import sys

    monkeypatch.setitem(sys.modules, "ai_edge_quantizer", None)  # import now fails
    output = tmp_path / "noquant.edgepkg"
    result = build_bundle(_config(digits_tflite_example, keypair[0], output))
    attempts = result.manifest.quantization.attempts
    assert [a.status for a in attempts] == ["skipped", "skipped", "skipped", "passed"]
    assert "ai-edge-quantizer is not installed" in attempts[1].reason
    assert "pip install 'edgepack[packager]'" in attempts[1].reason


def test_measured_build_records_latency(digits_tflite_example, keypair, tmp_path):
    output = tmp_path / "measured.edgepkg"
    # raspberry-pi-4: on this x86 host int8 of the tiny digits model is slower than float,
    # which the speed check refuses only for a profile of the host's own architecture.
    config = _config(
        digits_tflite_example,
        keypair[0],
        output,
        profile="raspberry-pi-4",
        measure=True,
        recipe="int8-dynamic",
    )
    result = build_bundle(config)
    assert result.manifest.quantization.attempts[-1].speed.representative is False
    figures = result.manifest.measurements
    assert figures.runs >= 50
    assert 0 < figures.latency_ms_p50 <= figures.latency_ms_p95
    assert result.manifest.memory.basis == "measured"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data[: len(data) // 2], "not a valid TFLite model.*truncated"),
        (lambda data: data[:6], "too short for a TFLite model"),
        (lambda data: b"GGUF\x03\x00\x00\x00" + data[8:], "no 'TFL3' identifier.*GGUF"),
    ],
    ids=["truncated", "six-bytes", "gguf-bytes"],
)
def test_bad_tflite_files_are_refused(digits_tflite_example, keypair, tmp_path, damage, message):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(damage(digits_tflite_example.model.read_bytes()))
    with pytest.raises(ModelValidationError, match=message):
        build_bundle(_config(digits_tflite_example, keypair[0], tmp_path / "x.edgepkg", model=bad))
    assert not (tmp_path / "x.edgepkg").exists()


def test_an_onnx_file_named_tflite_is_refused_by_the_cli(
    digits_example, digits_tflite_example, keypair, tmp_path
):
    renamed = tmp_path / "digits.tflite"
    renamed.write_bytes(digits_example.model.read_bytes())
    done = edgepack(
        "build",
        str(renamed),
        "--profile",
        "raspberry-pi-4",
        "--key",
        str(keypair[0]),
        "--eval",
        str(digits_tflite_example.eval),
        "--no-measure",
        "-o",
        str(tmp_path / "x.edgepkg"),
    )
    assert done.returncode == 1
    assert "digits.tflite: not a TFLite model (no 'TFL3' identifier)" in done.stderr
    assert "probably ONNX (use the .onnx suffix)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x.edgepkg").exists()


def test_cli_build_prints_the_attempts_without_quantizer_progress_bars(
    digits_tflite_example, keypair, tmp_path
):
    output = tmp_path / "cli.edgepkg"
    done = edgepack(
        "build",
        str(digits_tflite_example.model),
        "--profile",
        "raspberry-pi-4",
        "--key",
        str(keypair[0]),
        "--calibration",
        str(digits_tflite_example.calibration),
        "--eval",
        str(digits_tflite_example.eval),
        "--no-measure",
        "-o",
        str(output),
    )
    assert done.returncode == 0, done.stderr
    assert "int8-static: passed the gate" in done.stderr
    assert "Running Calibration" not in done.stderr + done.stdout
    assert verify_bundle(output, keypair[1]).manifest.model.recipe == "int8-static"


def test_eval_data_of_the_wrong_dtype_is_refused(digits_tflite_example, keypair, tmp_path):
    images, labels = _eval(digits_tflite_example, 20)
    wrong = tmp_path / "eval64.npz"
    np.savez(wrong, image=images.astype(np.float64), labels=labels)
    with pytest.raises(DataError, match="dtype float64, needs float32"):
        build_bundle(_config(digits_tflite_example, keypair[0], tmp_path / "x.edgepkg", eval=wrong))


def test_eval_is_required(digits_tflite_example, keypair, tmp_path):
    with pytest.raises(PackagerError, match="TFLite build needs --eval FILE.npz"):
        build_bundle(_config(digits_tflite_example, keypair[0], tmp_path / "x.edgepkg", eval=None))


def test_unknown_tflite_recipe(digits_tflite_example, keypair, tmp_path):
    with pytest.raises(PackagerError, match="unknown tflite recipe 'int4'.*int8-static"):
        build_bundle(
            _config(digits_tflite_example, keypair[0], tmp_path / "x.edgepkg", recipe="int4")
        )


def test_gate_error_when_nothing_passes(digits_tflite_example, keypair, tmp_path):
    with pytest.raises(GateError, match="no recipe met --max-degradation 0"):
        build_bundle(
            _config(
                digits_tflite_example,
                keypair[0],
                tmp_path / "x.edgepkg",
                recipe="int8-dynamic",
                max_degradation=0.0,
                task="generic",
            )
        )


def test_inspect_shows_the_tflite_bundle(tflite_pi4_bundle):
    result = CliRunner().invoke(cli, ["inspect", str(tflite_pi4_bundle), "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output)
    assert manifest["backend"]["name"] == "tflite"
    assert manifest["model"]["signature"] == "serving_default"
    shown = CliRunner().invoke(cli, ["inspect", str(tflite_pi4_bundle)])
    assert shown.exit_code == 0, shown.output
    assert "backend    tflite: XNNPACK on, 4 threads" in shown.output
    assert "model/model.tflite: int8-static (int8), signature serving_default" in shown.output
