"""The build pipeline on the real digits CNN: gate, fallback, fit, reproducibility."""

import numpy as np
import pytest
import yaml

from edge_runtime import Runtime
from edge_runtime.bundle import verify_bundle
from packager.build import BuildConfig, build_bundle
from packager.errors import DataError, FitError, GateError, ModelValidationError
from packager.profiles import load_profile
from tests.conftest import build_example


def test_cnn_static_int8_passes_the_gate_and_is_recorded(cnn_bundle, keypair):
    manifest = verify_bundle(cnn_bundle, keypair[1]).manifest

    chosen = manifest.quantization.attempts[0]
    assert manifest.quantization.chosen == "int8-static-qdq-per-channel" == chosen.recipe
    assert chosen.status == "passed"
    assert chosen.metrics["top1_agreement"] >= 0.99
    assert chosen.metrics["accuracy_drop"] <= 0.01
    assert manifest.model.precision == "int8"
    assert manifest.measurements is None
    assert manifest.memory.basis == "estimated"
    assert [spec.describe() for spec in manifest.inputs] == ["image: float32[batch, 1, 8, 8]"]


def test_gate_falls_back_down_the_chain_and_records_every_attempt(
    digits_example, keypair, tmp_path
):
    result = build_example(
        digits_example, keypair[0], tmp_path / "b.edgepkg", "x86-64-avx2", max_degradation=0.0
    )

    # Static int8 disagrees with fp32 on a digit or two, so a zero threshold rejects it.
    attempts = result.manifest.quantization.attempts
    assert attempts[0].recipe == "int8-static-qdq-per-channel"
    assert attempts[0].status == "failed"
    assert attempts[0].metrics["top1_agreement"] < 1.0
    assert "degradation" in attempts[0].reason
    assert len(attempts) >= 2
    assert [a.status for a in attempts[1:-1]] == ["failed"] * (len(attempts) - 2)
    assert attempts[-1].status == "passed"
    assert attempts[-1].metrics["top1_agreement"] == 1.0
    assert result.manifest.quantization.chosen == attempts[-1].recipe


def test_no_passing_recipe_fails_with_every_attempt(digits_example, keypair, tmp_path):
    with pytest.raises(GateError) as error:
        build_example(
            digits_example,
            keypair[0],
            tmp_path / "b.edgepkg",
            "x86-64-avx2",
            recipe="int8-static-qdq-per-channel",
            max_degradation=0.0,
        )

    assert "no recipe met --max-degradation 0.0" in str(error.value)
    assert [a.recipe for a in error.value.attempts] == ["int8-static-qdq-per-channel"]
    assert not (tmp_path / "b.edgepkg").exists()


def test_static_recipe_without_calibration_is_skipped(digits_example, keypair, tmp_path):
    config = BuildConfig(
        model=digits_example.model,
        profile=load_profile("raspberry-pi-4"),
        key=keypair[0],
        output=tmp_path / "b.edgepkg",
        eval=digits_example.eval,
        measure=False,
    )

    result = build_bundle(config)

    first = result.manifest.quantization.attempts[0]
    assert (first.recipe, first.status) == ("int8-static-qdq-per-channel", "skipped")
    assert "--calibration" in first.reason
    assert result.manifest.quantization.chosen == "int8-dynamic-per-channel"


def test_model_too_big_for_the_budget_fails_the_build(digits_example, keypair, tmp_path):
    data = load_profile("raspberry-pi-4").model_dump(mode="json")
    data.update(name="tiny-mcu-board", model_memory_budget_mb=1)
    profile_file = tmp_path / "tiny.yaml"
    profile_file.write_text(yaml.safe_dump(data))
    config = BuildConfig(
        model=digits_example.model,
        profile=load_profile(path=profile_file),
        key=keypair[0],
        output=tmp_path / "b.edgepkg",
        calibration=digits_example.calibration,
        eval=digits_example.eval,
        measure=False,
    )

    with pytest.raises(FitError) as error:
        build_bundle(config)

    message = str(error.value)
    assert "profile 'tiny-mcu-board' allows 1 MB" in message
    assert "larger device profile" in message
    assert not (tmp_path / "b.edgepkg").exists()


def test_no_measure_builds_are_byte_identical(digits_example, keypair, tmp_path):
    first = build_example(digits_example, keypair[0], tmp_path / "1.edgepkg", "raspberry-pi-5")
    second = build_example(digits_example, keypair[0], tmp_path / "2.edgepkg", "raspberry-pi-5")

    assert first.bundle.read_bytes() == second.bundle.read_bytes()


def test_created_time_honours_source_date_epoch(digits_example, keypair, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")

    result = build_example(digits_example, keypair[0], tmp_path / "b.edgepkg", "x86-64-avx2")

    assert result.manifest.created == "2023-11-14T22:13:20Z"


def test_measured_build_records_host_figures(digits_example, keypair, tmp_path):
    result = build_example(
        digits_example, keypair[0], tmp_path / "b.edgepkg", "x86-64-avx2", measure=True
    )

    measured = result.manifest.measurements
    assert measured.runs >= 50
    assert 0 < measured.latency_ms_p50 <= measured.latency_ms_p95
    assert measured.peak_memory_mb >= 0
    assert result.manifest.memory.basis == "measured"
    with Runtime.open(result.bundle, keypair[1]) as runtime:
        assert runtime.selftest().passed


@pytest.mark.parametrize("suffix", [".pt", ".pkl", ".pth", ".joblib"])
def test_pickle_based_formats_are_refused(tmp_path, keypair, digits_example, suffix):
    model = tmp_path / f"model{suffix}"
    model.write_bytes(b"\x80\x04K\x01.")
    config = BuildConfig(
        model=model,
        profile=load_profile("x86-64-avx2"),
        key=keypair[0],
        output=tmp_path / "b.edgepkg",
        eval=digits_example.eval,
    )

    with pytest.raises(ModelValidationError, match="pickle-based model formats are refused"):
        build_bundle(config)


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"img": np.zeros((2, 1, 8, 8), np.float32)}, "missing \\['image'\\], unknown \\['img'\\]"),
        (
            {"image": np.zeros((2, 1, 8, 8), np.float32), "labels": np.zeros(3, np.int64)},
            "same, non-zero sample count",
        ),
        ({"image": np.array([object()], dtype=object)}, "holds an object array"),
    ],
)
def test_bad_eval_data_is_refused_with_the_expected_layout(
    digits_example, keypair, tmp_path, arrays, message
):
    config = BuildConfig(
        model=digits_example.model,
        profile=load_profile("x86-64-avx2"),
        key=keypair[0],
        output=tmp_path / "b.edgepkg",
        eval=_npz(tmp_path / "eval.npz", **arrays),
    )

    with pytest.raises(DataError, match=message):
        build_bundle(config)
