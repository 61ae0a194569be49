"""OnnxOpsetUpgrade (packager/passes/onnx_opset.py): a model below opset 13 is converted,
checked against the original on the eval data, and recorded."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper, version_converter

from edge_runtime import Runtime
from packager.build import BuildConfig, build_bundle
from packager.errors import ModelValidationError
from packager.passes import ModelArtifact, OnnxOpsetUpgrade, PassContext
from packager.passes.onnx_opset import output_drift
from packager.profiles import load_profile

WEIGHT = (np.arange(12, dtype=np.float32).reshape(4, 3) - 5) / 7


def _opset11_model(path) -> None:
    """Unsqueeze, Squeeze and ReduceSum with an ``axes`` attribute: their signature changed
    at opset 13 (axes became an input), so the converter has to rewrite them."""
    graph = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["x"], ["x3"], axes=[1]),
            helper.make_node("MatMul", ["x3", "W"], ["m"]),
            helper.make_node("Squeeze", ["m"], ["y"], axes=[1]),
            helper.make_node("ReduceSum", ["y"], ["s"], axes=[1], keepdims=1),
        ],
        "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 1]),
        ],
        [numpy_helper.from_array(WEIGHT, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _eval(path, samples: int = 16) -> dict[str, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((samples, 4)).astype(np.float32) * 10
    np.savez(path, x=x)
    return {"x": x}


def _config(model, eval_file, keypair, tmp_path, **options) -> BuildConfig:
    return BuildConfig(
        model=model,
        profile=load_profile("x86-64-avx2"),
        key=keypair[0],
        output=tmp_path / "old.edgepkg",
        eval=eval_file,
        measure=False,
        **options,
    )


def test_an_opset_11_model_is_converted_to_13_and_the_conversion_recorded(keypair, tmp_path):
    model, eval_file = tmp_path / "old.onnx", tmp_path / "eval.npz"
    _opset11_model(model)
    _eval(eval_file)
    progress: list[str] = []

    result = build_bundle(
        _config(model, eval_file, keypair, tmp_path, recipe="fp32"), progress.append
    )

    manifest = result.manifest
    assert manifest.model.opset == 13
    assert [step.name for step in manifest.steps] == [
        "OnnxValidate",
        "OnnxOpsetUpgrade",
        "OnnxGraphOptimize",
    ]
    upgrade = manifest.steps[1]
    assert upgrade.config["target_opset"] == 13
    assert upgrade.output_sha256 is not None
    assert "opset: converted 11 -> 13, outputs match on the eval data" in progress
    with Runtime.open(result.bundle, keypair[1]) as runtime:
        bundled = onnx.load(str(runtime.model_dir / "model" / "model.onnx"))
        assert {o.version for o in bundled.opset_import if o.domain in ("", "ai.onnx")} == {13}
        x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
        outputs = runtime.run({"x": x})
    np.testing.assert_allclose(outputs["y"], x @ WEIGHT, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        outputs["s"], (x @ WEIGHT).sum(1, keepdims=True), rtol=1e-5, atol=1e-5
    )


def _upgrade(model, eval_data, tmp_path):
    ctx = PassContext(
        workdir=tmp_path / "work",
        profile=load_profile("x86-64-avx2"),
        source=model,
        evaluation=eval_data,
    )
    return OnnxOpsetUpgrade().run(ModelArtifact(model, "onnx"), ctx)


def test_a_model_at_opset_13_or_newer_is_left_alone(tmp_path):
    model = tmp_path / "new.onnx"
    _opset11_model(tmp_path / "old.onnx")
    onnx.save(version_converter.convert_version(onnx.load(str(tmp_path / "old.onnx")), 17), model)

    output, record = _upgrade(model, _eval(tmp_path / "eval.npz"), tmp_path)

    assert output.artifact.path == model
    assert output.metrics == {}
    assert record.output is None  # the engine leaves it out of the manifest's history


def test_a_conversion_that_changes_the_outputs_is_refused(tmp_path, monkeypatch):
    model = tmp_path / "old.onnx"
    _opset11_model(model)
    real_convert = version_converter.convert_version

    def convert_with_a_changed_weight(proto, target):
        converted = real_convert(proto, target)
        weight = converted.graph.initializer[0]
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, "W"))
        return converted

    monkeypatch.setattr(version_converter, "convert_version", convert_with_a_changed_weight)

    with pytest.raises(ModelValidationError) as caught:
        _upgrade(model, _eval(tmp_path / "eval.npz"), tmp_path)

    message = str(caught.value)
    assert "from opset 11 to 13 changed what it computes on the eval data" in message
    assert "output 'y' differs by up to" in message
    assert "re-export the model with opset >= 13" in message


def test_a_model_the_converter_cannot_convert_is_refused_with_a_fix(tmp_path, monkeypatch):
    model = tmp_path / "old.onnx"
    _opset11_model(model)

    def fail(proto, target):
        raise RuntimeError("No Adapter For Squeeze")

    monkeypatch.setattr(version_converter, "convert_version", fail)

    with pytest.raises(ModelValidationError, match="could not convert it to 13: No Adapter"):
        _upgrade(model, _eval(tmp_path / "eval.npz"), tmp_path)


def test_drift_is_judged_against_the_size_of_the_values():
    big = {"boxes": np.array([[300.0, 120.0]], np.float32)}
    small = {"score": np.array([[0.003]], np.float32)}

    assert output_drift({"boxes": big["boxes"] + 0.01}, big, 1e-4) == []
    assert output_drift({"score": small["score"] + 0.01}, small, 1e-4) != []
    assert output_drift({"score": np.zeros((1, 2), np.float32)}, small, 1e-4) != []
