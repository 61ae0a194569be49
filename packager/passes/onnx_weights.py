"""Weight-only compression of ONNX models: the weights are stored small and widened back
to float32 inside the graph; activations and arithmetic stay float32.

This is the compression for models whose activations do not survive int8 (a detector
head that mixes box coordinates and class scores, a recurrent state, a CTC recogniser)
and for CPUs without float16 arithmetic. The weights carry most of a model's bytes but
little of its quantization error: per output channel, int8 rounds each weight by at most
half of 1/127 of its channel's largest one.

- ``OnnxInt8Weights``: int8 per output channel, widened by Cast(int8 -> float32) times
  the channel's scale, under the weight's original name. About 4x smaller.
- ``OnnxFloat16Weights``: float16, a Cast to float32. About 2x smaller; TFLite's float16
  quantization does the same on CPUs.

Both widen with plain Cast and Mul on constants, which ONNX Runtime's basic graph
optimizations (on by default) fold into float32 constants when the session loads: the
model then runs as the float32 one, with the same fusions and kernels. (A
DequantizeLinear is not folded: ONNX Runtime keeps it for QDQ fusion, so each Conv would
re-widen its weight on every call and lose its NCHWc kernel; measured 0.77x the speed of
float32 on the corpus's YOLOv8n.)

ONNX Runtime has no weight-only quantizer for Conv (its MatMulNBits quantizer covers
MatMul only), hence the rewrite here; both passes share it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from .base import ModelArtifact, Pass, PassConfig, PassContext, PassOutput, RecipeSkippedError

# float16's largest finite value: a weight beyond it would become inf.
FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class Widened:
    """What replaces one float32 weight: the small tensors and the nodes that widen them
    back to float32, the last one under the weight's name."""

    tensors: tuple[Any, ...]  # onnx TensorProto
    nodes: tuple[Any, ...]  # onnx NodeProto, in order


# (weight name, values, its consumers as (node, input index)) -> Widened, or KEEP (it stays
# float32 and is counted), or None (it stays float32: not a weight this rewrite takes).
Converter = Callable[[str, Any, list[tuple[Any, int]]], "Widened | str | None"]
KEEP = "keep"


def rewrite_weights(graph, convert: Converter, names: set[str] | None = None) -> tuple[int, int]:
    """Rewrite ``graph`` and its subgraphs (If/Loop/Scan bodies) in place: each float32
    initializer that ``convert`` takes is replaced by its small form plus the node that
    widens it, under the original name, so every consumer (in this graph or a nested one)
    is unchanged. Returns (weights rewritten, weights kept float32 by ``KEEP``)."""
    from onnx import AttributeProto, TensorProto, numpy_helper

    # Names already used anywhere in the model, so a new one never shadows another.
    names = _all_names(graph) if names is None else names
    _constants_to_initializers(graph)
    rewritten = kept = 0
    for node in graph.node:
        for attribute in node.attribute:
            bodies = [attribute.g] if attribute.type == AttributeProto.GRAPH else []
            if attribute.type == AttributeProto.GRAPHS:
                bodies = list(attribute.graphs)
            for body in bodies:
                body_rewritten, body_kept = rewrite_weights(body, convert, names)
                rewritten, kept = rewritten + body_rewritten, kept + body_kept
    # An initializer that is also a graph input is a default the caller may override: its
    # type is part of the model's interface.
    inputs = {value.name for value in graph.input}
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    widening, keep_tensors, new_tensors = [], [], []
    for tensor in graph.initializer:
        result = None
        if tensor.data_type == TensorProto.FLOAT and tensor.name not in inputs:
            result = convert(
                tensor.name, numpy_helper.to_array(tensor), consumers.get(tensor.name, [])
            )
        if isinstance(result, Widened):
            new_tensors.extend(result.tensors)
            widening.extend(result.nodes)
            rewritten += 1
            continue
        kept += result == KEEP
        keep_tensors.append(tensor)
    if not widening:
        return rewritten, kept
    del graph.initializer[:]
    graph.initializer.extend(keep_tensors + new_tensors)
    # The widening nodes go first, so the node list stays in topological order.
    nodes = widening + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten, kept


def _constants_to_initializers(graph) -> None:
    """Constant nodes holding a tensor become initializers (what ONNX Runtime makes of them
    at load anyway), so weights exported as Constant nodes (silero-vad's are) are found."""
    from onnx import AttributeProto

    nodes = []
    for node in graph.node:
        value = node.attribute[0] if len(node.attribute) == 1 else None
        if (
            node.op_type == "Constant"
            and node.domain in ("", "ai.onnx")
            and value is not None
            and value.name == "value"
            and value.type == AttributeProto.TENSOR
        ):
            tensor = graph.initializer.add()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            continue
        nodes.append(node)
    if len(nodes) != len(graph.node):
        del graph.node[:]
        graph.node.extend(nodes)


def _all_names(graph) -> set[str]:
    from onnx import AttributeProto

    names = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    for node in graph.node:
        names.update(node.output)
        names.add(node.name)
        for attribute in node.attribute:
            if attribute.type == AttributeProto.GRAPH:
                names |= _all_names(attribute.g)
            elif attribute.type == AttributeProto.GRAPHS:
                for body in attribute.graphs:
                    names |= _all_names(body)
    return names


def fresh_name(names: set[str], wanted: str) -> str:
    name = wanted
    while name in names:
        name += "_"
    names.add(name)
    return name


class OnnxFloat16WeightsConfig(PassConfig):
    min_elements: int = Field(
        16, ge=1, description="float32 weights with fewer values stay float32 (nothing to gain)"
    )


class OnnxFloat16Weights(Pass):
    """Weights stored as float16, widened to float32 by a Cast that ONNX Runtime folds
    at load: half the file, float32 compute and speed."""

    name = "OnnxFloat16Weights"
    Config = OnnxFloat16WeightsConfig

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        import numpy as np
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        proto = onnx.load(str(model.path))
        names = _all_names(proto.graph)

        def to_float16(name, values, consumers):
            if values.size < self.config.min_elements:
                return None
            if not np.all(np.isfinite(values)) or np.abs(values).max() > FLOAT16_MAX:
                return KEEP
            small = fresh_name(names, f"{name}_fp16")
            return Widened(
                (numpy_helper.from_array(values.astype(np.float16), small),),
                (
                    helper.make_node(
                        "Cast",
                        [small],
                        [name],
                        name=fresh_name(names, f"{small}_to_float"),
                        to=TensorProto.FLOAT,
                    ),
                ),
            )

        stored, kept = rewrite_weights(proto.graph, to_float16, names)
        return _save(proto, out_dir, ctx, "fp16", stored, kept, "beyond float16's range")


class OnnxInt8WeightsConfig(PassConfig):
    min_elements: int = Field(
        256, ge=1, description="weights with fewer values stay float32 (biases, norms)"
    )


# The axis of a consumer's input that holds its output channels: one int8 scale each.
# (op type, input index) -> axis, negative from the end; others take axis 0.
_CHANNEL_AXIS = {
    ("Conv", 1): 0,  # [M, C/group, k...]
    ("ConvTranspose", 1): 1,  # [C, M/group, k...]
    ("MatMul", 1): -1,  # [..., K, N]
    ("MatMul", 0): -2,  # [..., M, K]
    ("LSTM", 1): 1,  # W, R: [directions, gates * hidden, ...]
    ("LSTM", 2): 1,
    ("GRU", 1): 1,
    ("GRU", 2): 1,
    ("RNN", 1): 1,
    ("RNN", 2): 1,
}


def channel_axis(values, consumers: list[tuple[Any, int]]) -> int:
    """The output-channel axis of a weight, from its first consumer (any axis gives a
    correct dequantization; this one gives the smallest error)."""
    axis = 0
    if consumers:
        node, index = consumers[0]
        if node.op_type == "Gemm" and index == 1:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else 1
        else:
            axis = _CHANNEL_AXIS.get((node.op_type, index), 0)
    return axis % values.ndim


class OnnxInt8Weights(Pass):
    """Weights stored as int8, one symmetric scale per output channel, widened to float32
    by Cast and Mul that ONNX Runtime folds at load; activations and arithmetic stay
    float32."""

    name = "OnnxInt8Weights"
    Config = OnnxInt8WeightsConfig

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        import numpy as np
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        proto = onnx.load(str(model.path))
        names = _all_names(proto.graph)

        def to_int8(name, values, consumers):
            if values.ndim < 2 or values.size < self.config.min_elements:
                return None
            if not np.all(np.isfinite(values)):
                return KEEP
            axis = channel_axis(values, consumers)
            others = tuple(i for i in range(values.ndim) if i != axis)
            # The scale keeps the weight's rank (1 on every other axis), so Mul broadcasts.
            largest = np.abs(values).max(axis=others, keepdims=True).astype(np.float64)
            scale = np.where(largest > 0, largest / 127.0, 1.0).astype(np.float32)
            quantized = np.clip(np.rint(values / scale), -127, 127).astype(np.int8)
            stem = fresh_name(names, f"{name}_int8")
            scale_name = fresh_name(names, f"{stem}_scale")
            widened = fresh_name(names, f"{stem}_to_float")
            cast = helper.make_node("Cast", [stem], [widened], name=widened, to=TensorProto.FLOAT)
            scaled = helper.make_node(
                "Mul", [widened, scale_name], [name], name=fresh_name(names, f"{stem}_scaled")
            )
            return Widened(
                (
                    numpy_helper.from_array(quantized, stem),
                    numpy_helper.from_array(scale, scale_name),
                ),
                (cast, scaled),
            )

        stored, kept = rewrite_weights(proto.graph, to_int8, names)
        return _save(proto, out_dir, ctx, "int8", stored, kept, "not finite")


def _save(proto, out_dir: Path, ctx: PassContext, precision: str, stored, kept, why: str):
    import onnx

    if not stored:
        raise RecipeSkippedError(f"the model has no float32 weights to store as {precision}")
    if kept:
        ctx.progress(f"{precision} weights: {kept} float32 weights stay float32 ({why})")
    output = out_dir / "model.onnx"
    onnx.save(proto, str(output))
    return PassOutput(ModelArtifact(output, "onnx", precision), {f"{precision}_weights": stored})
