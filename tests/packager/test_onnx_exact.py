"""packager/onnx_exact.py: integer ops rewritten to sum exactly, as ARM and VNNI do.

The inputs are chosen so that u8 x s8 pair sums overflow 16 bits (255 * 127 * 2 = 64770),
which ONNX Runtime's AVX2 kernels saturate; the rewritten model must give numpy's exact
int32 result on any host.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from packager.formats.onnx import _ExactSession
from packager.onnx_exact import exact_integer_model


def save(tmp_path, node, inputs, output, initializers):
    graph = helper.make_graph([node], "g", inputs, [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


def test_matmul_integer_sums_exactly_with_zero_points(tmp_path):
    rng = np.random.default_rng(0)
    weights = rng.integers(100, 128, (64, 5)).astype(np.int8)
    weight_zero = np.array([0, 1, -2, 3, 0], dtype=np.int8)  # per column
    path = save(
        tmp_path,
        helper.make_node("MatMulInteger", ["a", "w", "a_zero", "w_zero"], ["y"]),
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [2, 64])],
        helper.make_tensor_value_info("y", TensorProto.INT32, [2, 5]),
        [
            helper.make_tensor("w", TensorProto.INT8, [64, 5], weights.flatten().tolist()),
            helper.make_tensor("a_zero", TensorProto.UINT8, [], [3]),
            helper.make_tensor("w_zero", TensorProto.INT8, [5], weight_zero.tolist()),
        ],
    )
    a = np.full((2, 64), 255, dtype=np.uint8)
    a[1, ::2] = 250

    exact = _ExactSession(path).run({"a": a})["y"]

    expected = (a.astype(np.int64) - 3) @ (weights.astype(np.int64) - weight_zero)
    assert exact.dtype == np.int32
    np.testing.assert_array_equal(exact, expected)
    assert {n.op_type for n in exact_integer_model(path).graph.node} >= {"MatMul", "Cast", "Sub"}


def test_conv_integer_sums_exactly_with_a_zero_point_per_output_channel(tmp_path):
    rng = np.random.default_rng(1)
    weights = rng.integers(100, 128, (3, 2, 3, 3)).astype(np.int8)
    weight_zero = np.array([0, 2, -1], dtype=np.int8)
    path = save(
        tmp_path,
        helper.make_node("ConvInteger", ["x", "w", "", "w_zero"], ["y"], pads=[1, 1, 1, 1]),
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 2, 5, 5])],
        helper.make_tensor_value_info("y", TensorProto.INT32, [1, 3, 5, 5]),
        [
            helper.make_tensor("w", TensorProto.INT8, [3, 2, 3, 3], weights.flatten().tolist()),
            helper.make_tensor("w_zero", TensorProto.INT8, [3], weight_zero.tolist()),
        ],
    )
    x = rng.integers(240, 256, (1, 2, 5, 5)).astype(np.uint8)

    exact = _ExactSession(path).run({"x": x})["y"]

    padded = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    centred = weights.astype(np.int64) - weight_zero.reshape(3, 1, 1, 1)
    expected = np.zeros((1, 3, 5, 5), dtype=np.int64)
    for row in range(5):
        for col in range(5):
            patch = padded[0, :, row : row + 3, col : col + 3]
            expected[0, :, row, col] = (centred * patch).sum(axis=(1, 2, 3))
    np.testing.assert_array_equal(exact, expected)  # ONNX Runtime's own takes no such zero point


@pytest.mark.parametrize("op", ["Relu"])
def test_other_ops_are_left_as_they_are(tmp_path, op):
    path = save(
        tmp_path,
        helper.make_node(op, ["x"], ["y"]),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
        [],
    )

    nodes = exact_integer_model(path).graph.node

    assert [node.op_type for node in nodes] == [op]
