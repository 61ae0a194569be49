"""packager/onnx_model.py: the TensorSpecs of an ONNX graph, free dimensions included."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime import Runtime
from edge_runtime.errors import InputSignatureError
from packager.build import BuildConfig, build_bundle
from packager.onnx_model import model_signature
from packager.profiles import load_profile

WEIGHT = np.arange(12, dtype=np.float32).reshape(3, 4) / 10


def _image_model(path, dims) -> None:
    """x [N, 3, H, W] -> mean over the image -> MatMul [3, 4]; H, W written as ``dims``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, None, None])
    for dim, written in zip(x.type.tensor_type.shape.dim[2:], dims, strict=True):
        if written is not None:  # None: neither dim_value nor dim_param is set
            dim.dim_param = written
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["pooled", "W"], ["y"]),
        ],
        "image",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(WEIGHT, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _expected(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=(2, 3)) @ WEIGHT


@pytest.mark.parametrize("dims", [("?", "?"), (None, None), ("", "?"), ("?", None)])
def test_each_unnamed_or_question_mark_dimension_is_free_on_its_own(tmp_path, dims):
    path = tmp_path / "m.onnx"
    _image_model(path, dims)

    inputs, outputs, _ = model_signature(path)

    assert inputs[0].shape == ["N", 3, "x_dim2", "x_dim3"]
    assert outputs[0].shape == ["N", 4]


def test_a_generated_name_never_takes_a_name_the_graph_uses(tmp_path):
    path = tmp_path / "m.onnx"
    _image_model(path, ("x_dim3", "?"))  # the author named axis 2 what axis 3 would get

    inputs, _, _ = model_signature(path)

    assert inputs[0].shape == ["N", 3, "x_dim3", "x_dim3_2"]


def test_a_non_square_image_model_with_question_mark_dims_builds_and_runs(keypair, tmp_path):
    model = tmp_path / "image.onnx"
    _image_model(model, ("?", "?"))
    rng = np.random.default_rng(0)
    eval_file = tmp_path / "eval.npz"
    np.savez(eval_file, x=rng.standard_normal((6, 3, 48, 192)).astype(np.float32))
    config = BuildConfig(
        model=model,
        profile=load_profile("x86-64-avx2"),
        key=keypair[0],
        output=tmp_path / "image.edgepkg",
        eval=eval_file,
        recipe="fp32",
        measure=False,
    )

    result = build_bundle(config)

    assert [spec.describe() for spec in result.manifest.inputs] == [
        "x: float32[N, 3, x_dim2, x_dim3]"
    ]
    with Runtime.open(result.bundle, keypair[1]) as runtime:
        for shape in [(1, 3, 48, 192), (2, 3, 192, 48), (1, 3, 7, 5)]:
            x = rng.standard_normal(shape).astype(np.float32)
            np.testing.assert_allclose(runtime.run({"x": x})["y"], _expected(x), rtol=1e-5)
        # A wrong rank is still refused, with the signature in the message.
        with pytest.raises(InputSignatureError, match=r"x: float32\[N, 3, x_dim2, x_dim3\]"):
            runtime.run({"x": np.zeros((3, 48, 192), np.float32)})
