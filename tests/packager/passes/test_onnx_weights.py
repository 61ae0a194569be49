"""fp16-weights: float16 storage, float32 compute. The file halves, ONNX Runtime folds the
casts when the session loads, and the outputs stay those of the float32 model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from packager.data import load_npz
from packager.passes import ModelArtifact, OnnxFloat16Weights, OnnxInt8Weights, PassContext
from packager.passes.base import RecipeSkippedError
from packager.profiles import load_profile


@pytest.fixture
def ctx(tmp_path):
    return PassContext(workdir=tmp_path / "work", profile=load_profile("x86-64-avx2"))


def _session(path, level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, optimized=None):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_digits_halves_and_keeps_its_outputs(digits_example, ctx, tmp_path):
    evaluation, _ = load_npz(digits_example.eval, ["image"], "eval")
    images = evaluation["image"][:64]

    output, record = OnnxFloat16Weights().run(ModelArtifact(digits_example.model, "onnx"), ctx)

    path = output.artifact.path
    assert output.artifact.precision == "fp16"
    assert record.output == path
    ratio = digits_example.model.stat().st_size / path.stat().st_size
    assert ratio > 1.8, f"only {ratio:.2f}x smaller"
    proto = onnx.load(str(path))
    stored = [t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert stored and output.metrics["fp16_weights"] == len(stored)
    # The interface is unchanged: float32 in, float32 out.
    session = _session(path)
    assert session.get_inputs()[0].type == "tensor(float)"
    reference = _session(digits_example.model).run(None, {"image": images})[0]
    result = session.run(None, {"image": images})[0]
    assert result.dtype == np.float32
    assert np.array_equal(result.argmax(1), reference.argmax(1))
    scale = np.abs(reference).max()
    assert np.abs(result - reference).max() < 1e-2 * scale
    # ONNX Runtime folds every Cast into a float32 constant at load: the graph that runs
    # is the float32 one (same speed).
    _session(path, optimized=tmp_path / "folded.onnx")
    folded = onnx.load(str(tmp_path / "folded.onnx"))
    assert "Cast" not in {node.op_type for node in folded.graph.node}
    assert {t.data_type for t in folded.graph.initializer} <= {TensorProto.FLOAT, TensorProto.INT64}


def _model(path, initializers, nodes, inputs=None, outputs=("y",), opset=17):
    graph = helper.make_graph(
        nodes,
        "g",
        inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [numpy_helper.from_array(value, name) for name, value in initializers.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return ModelArtifact(path, "onnx")


def test_subgraph_weights_and_outer_scope_references(ctx, tmp_path):
    """An If whose branches use a weight of their own and one of the outer graph
    (silero-vad's shape): both are stored as float16 and the model still runs."""
    rng = np.random.default_rng(0)
    outer = rng.standard_normal((32, 32)).astype(np.float32)
    inner = rng.standard_normal((32, 32)).astype(np.float32)

    def branch(name, weight):
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", weight], [f"{name}_y"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(inner, "inner")] if weight == "inner" else [],
        )

    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    model = _model(
        tmp_path / "if.onnx",
        {"outer": outer},
        [
            helper.make_node(
                "If",
                ["flag"],
                ["y"],
                then_branch=branch("then", "outer"),
                else_branch=branch("else", "inner"),
            )
        ],
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32]), flag],
    )

    output, _ = OnnxFloat16Weights().run(model, ctx)

    assert output.metrics["fp16_weights"] == 2
    x = rng.standard_normal((2, 32)).astype(np.float32)
    session = _session(output.artifact.path)
    for flag_value, weight in ((True, outer), (False, inner)):
        result = session.run(None, {"x": x, "flag": np.array(flag_value)})[0]
        np.testing.assert_allclose(result, x @ weight, rtol=2e-2, atol=2e-2)


def test_out_of_range_weights_stay_float32_and_overridable_ones_untouched(ctx, tmp_path):
    """A mask constant beyond float16's range would become inf; an initializer that is
    also a graph input is part of the interface. Both stay float32."""
    weight = np.full((32, 32), 0.5, np.float32)
    mask = np.full((2, 32), -1e9, np.float32)
    bias = np.ones((2, 32), np.float32)
    model = _model(
        tmp_path / "mask.onnx",
        {"w": weight, "mask": mask, "bias": bias},
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["h", "mask"], ["masked"]),
            helper.make_node("Add", ["masked", "bias"], ["y"]),
        ],
        inputs=[
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, [2, 32]),
        ],
    )
    notes = []
    ctx.progress = notes.append

    output, _ = OnnxFloat16Weights().run(model, ctx)

    types = {t.name: t.data_type for t in onnx.load(str(output.artifact.path)).graph.initializer}
    assert types["mask"] == TensorProto.FLOAT
    assert types["bias"] == TensorProto.FLOAT
    assert types["w_fp16"] == TensorProto.FLOAT16
    assert any("1 float32 weights stay float32" in note for note in notes)
    x = np.ones((2, 32), np.float32)
    result = _session(output.artifact.path).run(None, {"x": x})[0]
    assert np.all(np.isfinite(result))
    np.testing.assert_allclose(result, x @ weight + mask + bias, rtol=1e-6)


def test_a_model_without_float_weights_is_skipped(ctx, tmp_path):
    model = _model(
        tmp_path / "relu.onnx",
        {"tiny": np.ones(2, np.float32)},
        [helper.make_node("Relu", ["x"], ["y"])],
    )

    with pytest.raises(RecipeSkippedError, match="no float32 weights"):
        OnnxFloat16Weights().run(model, ctx)


def test_int8_weights_quarter_the_digits_model_and_keep_its_answers(digits_example, ctx, tmp_path):
    evaluation, _ = load_npz(digits_example.eval, ["image"], "eval")
    images = evaluation["image"][:64]

    output, _ = OnnxInt8Weights().run(ModelArtifact(digits_example.model, "onnx"), ctx)

    path = output.artifact.path
    assert output.artifact.precision == "int8"
    ratio = digits_example.model.stat().st_size / path.stat().st_size
    assert ratio > 3.0, f"only {ratio:.2f}x smaller"
    proto = onnx.load(str(path))
    int8 = [t for t in proto.graph.initializer if t.data_type == TensorProto.INT8]
    assert int8 and output.metrics["int8_weights"] == len(int8)
    # Activations stay float: no QuantizeLinear anywhere.
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in proto.graph.node}
    # ONNX Runtime folds the widening at load: the graph that runs is the float32 one.
    _session(path, optimized=tmp_path / "folded.onnx")
    folded = onnx.load(str(tmp_path / "folded.onnx"))
    assert "Cast" not in {node.op_type for node in folded.graph.node}
    assert TensorProto.INT8 not in {t.data_type for t in folded.graph.initializer}
    reference = _session(digits_example.model).run(None, {"image": images})[0]
    result = _session(path).run(None, {"image": images})[0]
    assert np.mean(result.argmax(1) == reference.argmax(1)) >= 0.98
    assert np.abs(result - reference).max() < 0.05 * np.abs(reference).max()


@pytest.mark.parametrize(
    "op, weight_shape, attributes, expected_axis",
    [
        ("MatMul", (32, 48), {}, 1),
        ("Gemm", (48, 32), {"transB": 1}, 0),
        ("Gemm", (32, 48), {}, 1),
    ],
)
def test_int8_weights_scale_each_output_channel(
    ctx, tmp_path, op, weight_shape, attributes, expected_axis
):
    """One scale per output channel: a column of tiny weights next to a column of large
    ones keeps its precision (a per-tensor scale would round it to zero)."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal(weight_shape).astype(np.float32)
    index = [slice(None)] * 2
    index[expected_axis] = 0
    weight[tuple(index)] *= 1e-3  # output channel 0: a thousand times smaller
    model = _model(
        tmp_path / f"{op}.onnx",
        {"w": weight},
        [helper.make_node(op, ["x", "w"], ["y"], **attributes)],
    )

    output, _ = OnnxInt8Weights().run(model, ctx)

    proto = onnx.load(str(output.artifact.path))
    scale = next(t for t in proto.graph.initializer if t.name == "w_int8_scale")
    assert scale.dims[expected_axis] == weight.shape[expected_axis]
    assert scale.dims[1 - expected_axis] == 1
    x = rng.standard_normal((2, 32)).astype(np.float32)
    expected = x @ (weight.T if attributes.get("transB") else weight)
    result = _session(output.artifact.path).run(None, {"x": x})[0]
    np.testing.assert_allclose(result[:, 0], expected[:, 0], rtol=0.05, atol=1e-4)
    np.testing.assert_allclose(result, expected, rtol=0.05, atol=0.05)


def test_int8_weights_leave_biases_and_small_tensors_float(ctx, tmp_path):
    weight = np.full((32, 32), 0.25, np.float32)
    bias = np.linspace(-1, 1, 32, dtype=np.float32)
    model = _model(
        tmp_path / "bias.onnx",
        {"w": weight, "b": bias},
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
    )

    output, _ = OnnxInt8Weights().run(model, ctx)

    types = {t.name: t.data_type for t in onnx.load(str(output.artifact.path)).graph.initializer}
    assert types["b"] == TensorProto.FLOAT
    assert types["w_int8"] == TensorProto.INT8
