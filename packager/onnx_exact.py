"""An ONNX model rewritten so its integer ops sum exactly, for the self-test bounds.

ONNX Runtime's int8 kernels on x86 AVX2 without VNNI multiply u8 by s8 with
``vpmaddubsw``, which saturates the 16-bit sum of each pair; ARM (``smull``/``sdot``)
and VNNI sum exactly. So a model quantized there computes differently on a Pi than on
the build host: MiniLM int8-dynamic by 0.030 (cosine 0.983) on emulated cortex-a72,
where this rewrite, run on the host, lands to the same 0.030. The packager runs the
bundled model this way too and keeps the outputs as the self-test's alternate reference.

``MatMulInteger`` and ``ConvInteger`` become casts, zero-point subtractions and a float
``MatMul`` (in float64: sums of up to millions of 16-bit products stay exact) or
``Conv`` (float32, ONNX Runtime has no float64 Conv: exact up to 2**24, then within a
unit in 1e7); QDQ models need nothing here, ONNX Runtime without graph fusions runs them
as dequantize, float op, quantize.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def exact_integer_model(path: Path) -> Any:
    """The model at ``path`` (an ``onnx.ModelProto``) with its integer ops made exact."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    nodes = []

    def centred(name: str, zero_point: str | None, to: int, prefix: str, shape=None) -> str:
        """``name`` cast to ``to`` minus its cast zero point (reshaped to ``shape``)."""
        nodes.append(helper.make_node("Cast", [name], [f"{prefix}/value"], to=to))
        if not zero_point:
            return f"{prefix}/value"
        nodes.append(helper.make_node("Cast", [zero_point], [f"{prefix}/zp"], to=to))
        point = f"{prefix}/zp"
        if shape is not None:
            shape_name = f"{prefix}/zp_shape"
            graph.initializer.append(
                helper.make_tensor(shape_name, TensorProto.INT64, [len(shape)], shape)
            )
            nodes.append(helper.make_node("Reshape", [point, shape_name], [f"{prefix}/zp_r"]))
            point = f"{prefix}/zp_r"
        nodes.append(helper.make_node("Sub", [f"{prefix}/value", point], [f"{prefix}/centred"]))
        return f"{prefix}/centred"

    for index, node in enumerate(graph.node):
        inputs = list(node.input) + [""] * (4 - len(node.input))
        prefix = f"exact/{index}"
        if node.op_type == "MatMulInteger":
            double = TensorProto.DOUBLE
            a = centred(inputs[0], inputs[2], double, f"{prefix}/a")
            b = centred(inputs[1], inputs[3], double, f"{prefix}/b")
            nodes.append(helper.make_node("MatMul", [a, b], [f"{prefix}/y"]))
        elif node.op_type == "ConvInteger" and _rank(graph, inputs[1]) >= 3:
            single = TensorProto.FLOAT
            x = centred(inputs[0], inputs[2], single, f"{prefix}/x")
            # A per-output-channel weight zero point broadcasts over [M, C, k...].
            shape = [-1] + [1] * (_rank(graph, inputs[1]) - 1)
            w = centred(inputs[1], inputs[3], single, f"{prefix}/w", shape=shape)
            attributes = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
            nodes.append(helper.make_node("Conv", [x, w], [f"{prefix}/y"], **attributes))
        else:
            nodes.append(node)
            continue
        nodes.append(
            helper.make_node("Cast", [f"{prefix}/y"], [node.output[0]], to=TensorProto.INT32)
        )
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _rank(graph, name: str) -> int:
    """The rank of initializer ``name``; 0 when it is not one (the node is left as is)."""
    for tensor in graph.initializer:
        if tensor.name == name:
            return len(tensor.dims)
    return 0
