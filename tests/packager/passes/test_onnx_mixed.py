"""int8-static-mixed: the nodes that break the gate are found and really kept in float.

The models are small graphs built here, each with one of the failures the search targets:
an attention-mask addition of -1e9, a final Concat of boxes (0-300) and scores (0-1), and
a hidden tensor with one dominant channel. Each runs in ONNX Runtime for real.
"""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime import Runtime
from edge_runtime.summary import summary_rows
from packager.build import BuildConfig, build_bundle
from packager.data import plain_dataset
from packager.errors import GateError, PackagerError
from packager.onnx_activations import measure_activations
from packager.passes import ModelArtifact, OnnxMixedPrecisionQuantize, PassContext
from packager.passes.evaluate import Evaluate
from packager.passes.onnx_mixed import (
    head_concat_tensors,
    huge_constant_tensors,
    load_graph,
    outlier_path,
)
from packager.profiles import load_profile

TOKENS, WIDTH = 16, 32


def _save(path: Path, nodes, inputs, outputs, weights: dict[str, np.ndarray]) -> Path:
    initializers = [numpy_helper.from_array(value, name) for name, value in weights.items()]
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def attention_model(path: Path) -> Path:
    """One self-attention block whose padding is masked by adding (1 - mask) * -1e9."""
    rng = np.random.default_rng(0)
    weights = {
        name: rng.normal(0, 0.3, (WIDTH, WIDTH)).astype(np.float32)
        for name in ("Wq", "Wk", "Wv", "Wo")
    }
    weights |= {
        "one": np.array(1.0, np.float32),
        "fill": np.array(-1e9, np.float32),
        "scale": np.array(1 / np.sqrt(WIDTH), np.float32),
        "axis1": np.array([1], np.int64),
    }
    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
        node("MatMul", ["x", "Wk"], ["k"], name="k_proj"),
        node("MatMul", ["x", "Wv"], ["v"], name="v_proj"),
        node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="k_t"),
        node("MatMul", ["q", "kt"], ["s0"], name="scores"),
        node("Mul", ["s0", "scale"], ["s"], name="scaled"),
        node("Sub", ["one", "mask"], ["inverted"], name="mask_invert"),
        node("Mul", ["inverted", "fill"], ["bias0"], name="mask_fill"),
        node("Unsqueeze", ["bias0", "axis1"], ["bias"], name="mask_unsqueeze"),
        node("Add", ["s", "bias"], ["masked"], name="mask_add"),
        node("Softmax", ["masked"], ["p"], axis=-1, name="softmax"),
        node("MatMul", ["p", "v"], ["context"], name="context"),
        node("MatMul", ["context", "Wo"], ["y"], name="out_proj"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", TOKENS, WIDTH]),
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", TOKENS]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", TOKENS, WIDTH])]
    return _save(path, nodes, inputs, outputs, weights)


def attention_data(count: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, TOKENS, count)
    return {
        "x": rng.normal(0, 1, (count, TOKENS, WIDTH)).astype(np.float32),
        "mask": (np.arange(TOKENS)[None, :] < lengths[:, None]).astype(np.float32),
    }


def detector_head_model(path: Path) -> Path:
    """Features -> boxes (0-300) and class scores (0-1), concatenated as one output."""
    rng = np.random.default_rng(1)
    weights = {
        "Wf": rng.normal(0, 0.3, (WIDTH, WIDTH)).astype(np.float32),
        "Wb": rng.normal(0, 0.3, (WIDTH, 4)).astype(np.float32),
        "Ws": rng.normal(0, 0.6, (WIDTH, 12)).astype(np.float32),
        "stride": np.array(60.0, np.float32),
    }
    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "Wf"], ["f0"], name="features"),
        node("Relu", ["f0"], ["f"], name="features_relu"),
        node("MatMul", ["f", "Wb"], ["b0"], name="box_proj"),
        node("Relu", ["b0"], ["b1"], name="box_relu"),
        node("Mul", ["b1", "stride"], ["boxes"], name="box_scale"),
        node("MatMul", ["f", "Ws"], ["s0"], name="score_proj"),
        node("Sigmoid", ["s0"], ["scores"], name="score_sigmoid"),
        node("Concat", ["boxes", "scores"], ["y"], axis=-1, name="head_concat"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])]
    return _save(path, nodes, inputs, outputs, weights)


def outlier_model(path: Path) -> Path:
    """A hidden tensor with one channel 300 times the others, undone by the next layer."""
    rng = np.random.default_rng(2)

    def weight():
        return rng.normal(0, 1 / np.sqrt(WIDTH), (WIDTH, WIDTH)).astype(np.float32)

    w1, w2 = weight(), weight()
    w1[:, 0] *= 300.0
    w2[0, :] /= 300.0
    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "w0"], ["a"], name="mm0"),
        node("Tanh", ["a"], ["b"], name="act0"),
        node("MatMul", ["b", "w1"], ["h"], name="mm1"),
        node("MatMul", ["h", "w2"], ["c"], name="mm2"),
        node("Tanh", ["c"], ["d"], name="act1"),
        node("MatMul", ["d", "w3"], ["y"], name="mm3"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])]
    weights = {"w0": weight(), "w1": w1, "w2": w2, "w3": weight()}
    return _save(path, nodes, inputs, outputs, weights)


def gaussian_data(count: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(0, 1, (count, WIDTH)).astype(np.float32)}


def _ctx(tmp_path: Path, model: Path, calibration, evaluation) -> PassContext:
    return PassContext(
        workdir=tmp_path / "work",
        profile=load_profile("x86-64-avx2"),
        source=model,
        calibration=calibration,
        evaluation=evaluation,
    )


def _run(model: Path, ctx: PassContext, **config):
    return OnnxMixedPrecisionQuantize(config).run(ModelArtifact(model, "onnx"), ctx)[0]


def assert_float(path: Path, excluded: list[str], kept_tensors: tuple[str, ...] = ()) -> None:
    """Each excluded node is in the file with its own op type (no int8 kernel replaced
    it), its weights are float32 (none is a dequantized int8 initializer), and the tensors
    ``kept_tensors`` it reads or writes are never quantized."""
    model = onnx.load(str(path))
    initializers = {init.name: init.data_type for init in model.graph.initializer}
    dequantized_weights = {
        node.output[0]
        for node in model.graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers
    }
    quantized = {node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear"}
    nodes = {node.name: node for node in model.graph.node}
    for name in excluded:
        node = nodes[name]
        assert not node.op_type.startswith("QLinear"), name
        assert not set(node.input) & dequantized_weights, f"{name} reads int8 weights"
        for tensor in node.input:
            if tensor in initializers:
                assert initializers[tensor] in (TensorProto.FLOAT, TensorProto.INT64), tensor
    assert not set(kept_tensors) & quantized
    # The check can fail: a quantized node reads its weights through DequantizeLinear.
    assert dequantized_weights or not quantized


def _judge(ctx: PassContext):
    gate = Evaluate()
    return lambda artifact: gate.run(artifact, ctx)[0].metrics


def test_mask_addition_is_kept_in_float_and_passes(tmp_path):
    model = attention_model(tmp_path / "attention.onnx")
    ctx = _ctx(tmp_path, model, attention_data(32, 1), attention_data(16, 2))
    lines = []
    ctx.progress = lines.append

    output = _run(model, ctx)

    excluded = output.metrics["excluded_nodes"]
    assert {"mask_fill", "mask_add", "softmax"} <= set(excluded)
    assert output.metrics["whole_graph_degradation"] > 0.1  # one int8 scale for -1e9 and scores
    assert _judge(ctx)(output.artifact)["passed"]
    assert_float(output.artifact.path, excluded, ("bias0", "bias", "masked"))
    assert any("huge constants" in line for line in lines)
    ops = {node.op_type for node in onnx.load(str(output.artifact.path)).graph.node}
    assert "QuantizeLinear" in ops  # the rest is still int8


def test_head_concat_with_mixed_ranges_is_found(tmp_path):
    model = detector_head_model(tmp_path / "head.onnx")
    graph = load_graph(model)
    ranges = measure_activations(
        model, None, list(plain_dataset(gaussian_data(16, 3)).feeds()), tmp_path
    ).ranges

    assert ranges["boxes"][1] > 50 * ranges["scores"][1]
    assert head_concat_tensors(graph, ranges, 20.0) == ["y"]
    assert huge_constant_tensors(graph, ranges, 1e4) == []
    assert graph.keep_float("y") == {"head_concat"}


def test_head_concat_in_float_keeps_the_scores(tmp_path):
    """A judge that checks the scores on their own (as a detection metric would) fails
    whole-graph int8, whose single output scale crushes them; the head heuristic fixes it."""
    model = detector_head_model(tmp_path / "head.onnx")
    ctx = _ctx(tmp_path, model, gaussian_data(32, 4), gaussian_data(32, 5))
    reference = ort.InferenceSession(str(model)).run(None, ctx.evaluation)[0]

    def scores_judge(artifact):
        got = ort.InferenceSession(str(artifact.path)).run(None, ctx.evaluation)[0]
        error = float(np.abs(got[:, 4:] - reference[:, 4:]).mean())
        return {"passed": error < 0.03, "degradation": error}

    ctx.judge = scores_judge
    output = _run(model, ctx)

    assert output.metrics["whole_graph_degradation"] > 0.1  # scores in steps of 300/255
    assert output.metrics["excluded_nodes"] == ["head_concat"]
    assert scores_judge(output.artifact)["passed"]
    assert_float(output.artifact.path, output.metrics["excluded_nodes"], ("y",))


def test_sensitivity_search_finds_the_outlier_tensor(tmp_path):
    model = outlier_model(tmp_path / "outlier.onnx")
    ctx = _ctx(tmp_path, model, gaussian_data(32, 6), gaussian_data(32, 7))
    lines = []
    ctx.progress = lines.append

    output = _run(model, ctx)

    # h = b @ w1: its dominant channel sets one int8 scale that zeroes the others.
    assert {"mm1", "mm2"} <= set(output.metrics["excluded_nodes"])
    assert _judge(ctx)(output.artifact)["passed"]
    assert_float(output.artifact.path, output.metrics["excluded_nodes"], ("h",))
    assert any("sensitivity step 1" in line for line in lines)


def test_the_search_stops_at_the_node_limit(tmp_path):
    model = outlier_model(tmp_path / "outlier.onnx")
    ctx = _ctx(tmp_path, model, gaussian_data(16, 6), gaussian_data(16, 7))
    lines = []
    ctx.progress = lines.append

    output = _run(model, ctx, max_excluded_nodes=1, search_steps=2)

    assert len(output.metrics["excluded_nodes"]) <= 1
    assert not _judge(ctx)(output.artifact)["passed"]  # the engine's gate records the failure
    assert any("search stopped" in line for line in lines)


def test_unknown_config_keys_are_refused():
    with pytest.raises(PackagerError, match="max_excluded_node"):
        OnnxMixedPrecisionQuantize({"max_excluded_node": 3})


def test_build_chooses_mixed_and_records_the_excluded_nodes(tmp_path, keypair):
    model = attention_model(tmp_path / "attention.onnx")
    np.savez(tmp_path / "calibration.npz", **attention_data(32, 1))
    np.savez(tmp_path / "eval.npz", **attention_data(16, 2))
    config = BuildConfig(
        model=model,
        profile=load_profile("x86-64-avx2"),
        key=keypair[0],
        output=tmp_path / "attention.edgepkg",
        calibration=tmp_path / "calibration.npz",
        eval=tmp_path / "eval.npz",
        measure=False,
    )

    lines = []
    manifest = build_bundle(config, lines.append).manifest

    attempts = {attempt.recipe: attempt for attempt in manifest.quantization.attempts}
    # The chain judged the whole graph in int8-static-qdq-per-channel; the search does not
    # quantize and judge it again.
    assert "mixed precision: the whole graph in int8 was judged by the recipe before" in lines
    assert not any("whole graph in int8 (0 nodes" in line for line in lines)
    # ... and it reuses that recipe's activation ranges: min-max calibration runs once.
    assert sum(line.startswith("calibrating on") and "(minmax)" in line for line in lines) == 1
    assert attempts["int8-static-qdq-per-channel"].status == "failed"
    assert manifest.quantization.chosen == "int8-static-mixed"
    chosen = attempts["int8-static-mixed"]
    assert chosen.status == "passed"
    assert {"mask_add", "softmax"} <= set(chosen.excluded_nodes)
    assert manifest.model.precision == "int8"
    # inspect and info name them
    [kept] = [value for label, value in summary_rows(manifest) if label == "kept float"]
    assert kept.startswith(f"{len(chosen.excluded_nodes)} nodes: ") and "mask_add" in kept
    with Runtime.open(config.output, keypair[1]) as runtime:
        assert runtime.selftest().passed


def test_mixed_recipe_without_calibration_is_skipped(tmp_path, keypair):
    model = attention_model(tmp_path / "attention.onnx")
    np.savez(tmp_path / "eval.npz", **attention_data(16, 2))
    config = BuildConfig(
        model=model,
        profile=load_profile("x86-64-avx2"),
        key=keypair[0],
        output=tmp_path / "attention.edgepkg",
        eval=tmp_path / "eval.npz",
        recipe="int8-static-mixed",
        measure=False,
    )

    with pytest.raises(GateError, match="int8-static-mixed: skipped") as error:
        build_bundle(config)

    assert "needs --calibration" in str(error.value)


def test_a_forced_mixed_recipe_judges_the_whole_graph_first(tmp_path, keypair):
    model = detector_head_model(tmp_path / "head.onnx")
    np.savez(tmp_path / "calibration.npz", **gaussian_data(16, 4))
    np.savez(tmp_path / "eval.npz", **gaussian_data(16, 5))
    config = BuildConfig(
        model=model,
        profile=load_profile("x86-64-avx2"),
        key=keypair[0],
        output=tmp_path / "head.edgepkg",
        calibration=tmp_path / "calibration.npz",
        eval=tmp_path / "eval.npz",
        recipe="int8-static-mixed",
        max_degradation=0.5,
        measure=False,
    )
    lines = []

    manifest = build_bundle(config, lines.append).manifest

    assert any("whole graph in int8 (0 nodes in float)" in line for line in lines)
    [attempt] = manifest.quantization.attempts
    assert (attempt.status, attempt.excluded_nodes) == ("passed", [])


def test_a_mixed_candidate_races_the_next_recipe_on_speed(tmp_path, keypair):
    """Float islands and their QDQ pairs cost time: when int8-static-mixed passes, the next
    recipe (dynamic int8) is tried too and the faster of the two is chosen. raspberry-pi-4
    on this host: timed, not representative, so neither is refused for its speed."""
    model = attention_model(tmp_path / "attention.onnx")
    np.savez(tmp_path / "calibration.npz", **attention_data(32, 1))
    np.savez(tmp_path / "eval.npz", **attention_data(16, 2))
    config = BuildConfig(
        model=model,
        profile=load_profile("raspberry-pi-4"),
        key=keypair[0],
        output=tmp_path / "attention.edgepkg",
        calibration=tmp_path / "calibration.npz",
        eval=tmp_path / "eval.npz",
        measure=True,
        max_degradation=0.05,  # dynamic int8 scores about 0.02 here: both pass the gate
    )
    lines = []

    manifest = build_bundle(config, lines.append).manifest

    attempts = {attempt.recipe: attempt for attempt in manifest.quantization.attempts}
    mixed, dynamic = attempts["int8-static-mixed"], attempts["int8-dynamic-per-channel"]
    assert mixed.excluded_nodes and mixed.speed is not None
    assert "int8-dynamic-per-channel: tried too, in case it is faster than int8-static-mixed" in (
        lines
    )
    assert "fp32" not in attempts  # the race is between the two int8 recipes only
    assert dynamic.speed is not None  # it passed the gate too: the faster one wins
    winner, loser = sorted((mixed, dynamic), key=lambda a: -a.speed.ratio)
    assert manifest.quantization.chosen == winner.recipe
    assert (winner.status, loser.status) == ("passed", "failed")
    assert loser.reason.startswith(f"slower than {winner.recipe} on this host (")
    assert loser.metrics["degradation"] <= 0.05  # refused for its speed, not the gate


def test_an_outlier_range_is_followed_through_bias_and_residual_additions(tmp_path):
    """FFN output -> bias Add -> residual Add -> LayerNormalization: the outlier's range
    rides the two additions, and the normalisation ends it."""
    rng = np.random.default_rng(3)
    weight = rng.normal(0, 0.2, (WIDTH, WIDTH)).astype(np.float32)
    weight[:, 3] *= 200.0  # one hidden dimension far larger than the others
    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "w"], ["ffn"], name="ffn_matmul"),
        node("Add", ["ffn", "bias"], ["biased"], name="ffn_bias"),
        node("Add", ["biased", "x"], ["residual"], name="residual_add"),
        node("LayerNormalization", ["residual", "gamma", "beta"], ["y"], name="norm", axis=-1),
    ]
    weights = {
        "w": weight,
        "bias": np.zeros(WIDTH, np.float32),
        "gamma": np.ones(WIDTH, np.float32),
        "beta": np.zeros(WIDTH, np.float32),
    }
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])]
    model = _save(tmp_path / "ffn.onnx", nodes, inputs, outputs, weights)
    graph = load_graph(model)
    feeds = list(plain_dataset(gaussian_data(8, 4)).feeds())
    ranges = measure_activations(model, None, feeds, tmp_path).ranges

    follow = outlier_path(graph, "ffn", ranges, 0.5)

    assert follow == ["biased", "residual"]
    nodes_kept = set().union(*(graph.keep_float(t) for t in ["ffn", *follow]))
    assert nodes_kept == {"ffn_matmul", "ffn_bias", "residual_add", "norm"}
    assert outlier_path(graph, "y", ranges, 0.5) == []  # a graph output has no readers
