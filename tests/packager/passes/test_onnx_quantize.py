import numpy as np
import onnx
import onnxruntime as ort
import pytest

from packager.data import load_npz
from packager.passes import (
    ModelArtifact,
    OnnxDynamicQuantize,
    OnnxStaticQuantize,
    OnnxToFloat16,
    PassContext,
)
from packager.profiles import load_profile


@pytest.fixture
def digits_ctx(tmp_path, digits_example):
    calibration, _ = load_npz(digits_example.calibration, ["image"], "calibration")
    evaluation, labels = load_npz(digits_example.eval, ["image"], "eval")
    return PassContext(
        workdir=tmp_path / "work",
        profile=load_profile("x86-64-avx2"),
        calibration=calibration,
        evaluation=evaluation,
        labels=labels,
    )


def _ops(path):
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def _accuracy(path, evaluation, labels):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"image": evaluation["image"]})[0]
    return float((logits.argmax(axis=1) == labels).mean())


@pytest.mark.parametrize(
    "pass_class, expected_ops, precision",
    [
        (OnnxDynamicQuantize, {"DynamicQuantizeLinear"}, "int8"),
        (OnnxStaticQuantize, {"QuantizeLinear", "DequantizeLinear"}, "int8"),
        (OnnxToFloat16, {"Cast"}, "fp16"),
    ],
)
def test_precision_passes_make_runnable_accurate_models(
    digits_example, digits_ctx, pass_class, expected_ops, precision
):
    source = ModelArtifact(digits_example.model, "onnx")

    output, record = pass_class().run(source, digits_ctx)

    assert output.artifact.precision == precision
    assert expected_ops <= _ops(output.artifact.path)
    assert record.output == output.artifact.path  # a new file, hashed if the manifest keeps it
    reference = _accuracy(digits_example.model, digits_ctx.evaluation, digits_ctx.labels)
    accuracy = _accuracy(output.artifact.path, digits_ctx.evaluation, digits_ctx.labels)
    assert reference > 0.95
    assert accuracy >= reference - 0.02


def test_static_quantization_is_per_channel(digits_example, digits_ctx):
    output, _ = OnnxStaticQuantize().run(ModelArtifact(digits_example.model, "onnx"), digits_ctx)

    model = onnx.load(str(output.artifact.path))
    scales = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    per_channel = [name for name, value in scales.items() if "scale" in name and value.size > 1]
    assert per_channel, "expected per-channel weight scales"


def test_fp16_keeps_float32_io_and_halves_the_weights(digits_example, digits_ctx):
    output, _ = OnnxToFloat16().run(ModelArtifact(digits_example.model, "onnx"), digits_ctx)

    session = ort.InferenceSession(str(output.artifact.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"
    result = session.run(None, {"image": digits_ctx.evaluation["image"][:2]})[0]
    assert result.dtype == np.float32
    size_ratio = digits_example.model.stat().st_size / output.artifact.path.stat().st_size
    assert size_ratio > 1.8
