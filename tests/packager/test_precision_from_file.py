"""A quantized attempt must be quantized: the engine counts the weight tensors a recipe
left (``FormatPipeline.weights``), fails a recipe that changed nothing, and records the
precision the file holds, never the one a recipe's name promises."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from packager.build import BuildConfig, build_bundle
from packager.formats.onnx import PIPELINE as ONNX
from packager.formats.tflite import PIPELINE as TFLITE
from packager.profiles import load_profile
from tests.conftest import build_example

SCALE = (np.arange(32, dtype=np.float32).reshape(4, 8) + 1) / 16
WEIGHT = (np.arange(64, dtype=np.float32).reshape(8, 8) - 30) / 50


def _scaling_model(path) -> None:
    """y = x * S + b: a Mul by a [4, 8] weight, an op dynamic int8 does not quantize."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "S"], ["scaled"]),
            helper.make_node("Add", ["scaled", "b"], ["y"]),
        ],
        "scaling",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8])],
        [numpy_helper.from_array(SCALE, "S"), numpy_helper.from_array(np.ones(8, np.float32), "b")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _matmul_model(path) -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(WEIGHT, "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _build(model, eval_file, keypair, tmp_path, progress=None, **options):
    config = BuildConfig(
        model=model,
        profile=load_profile("x86-64-avx2"),
        key=keypair[0],
        output=tmp_path / f"{model.stem}.edgepkg",
        eval=eval_file,
        measure=False,
        **options,
    )
    return build_bundle(config, progress.append if progress is not None else lambda m: None)


def test_a_recipe_that_quantized_nothing_is_an_error_attempt(keypair, tmp_path):
    model, eval_file = tmp_path / "scaling.onnx", tmp_path / "eval.npz"
    _scaling_model(model)
    np.savez(eval_file, x=np.random.default_rng(0).standard_normal((8, 4, 8)).astype("f4"))
    progress: list[str] = []

    result = _build(model, eval_file, keypair, tmp_path, progress)

    attempts = {a.recipe: a for a in result.manifest.quantization.attempts}
    dynamic = attempts["int8-dynamic-per-channel"]
    assert dynamic.status == "error"
    assert dynamic.reason == "nothing was quantized (0 of 1 weight tensors are int8)"
    assert "int8-dynamic-per-channel: error: nothing was quantized" in " ".join(progress)
    # int8-weights takes no weight this small (a [4, 8] scale) and says so; fp16-weights
    # stores it as float16, which the file then holds.
    assert attempts["int8-weights"].status == "skipped"
    assert attempts["int8-weights"].reason == "the model has no float32 weights to store as int8"
    assert result.manifest.quantization.chosen == "fp16-weights"
    assert result.manifest.model.precision == "fp16"


def test_the_precision_comes_from_the_file_not_the_recipe_name(keypair, tmp_path):
    float_model, model = tmp_path / "float.onnx", tmp_path / "already-int8.onnx"
    _matmul_model(float_model)
    quantize_dynamic(str(float_model), str(model), weight_type=QuantType.QInt8)
    eval_file = tmp_path / "eval.npz"
    np.savez(eval_file, x=np.random.default_rng(0).standard_normal((8, 8)).astype("f4"))

    result = _build(model, eval_file, keypair, tmp_path, recipe="fp32")

    assert ONNX.weights(model).describe("int8") == "1 of 1 weight tensors are int8"
    assert result.manifest.quantization.chosen == "fp32"
    assert result.manifest.model.precision == "int8"  # what the file holds


def test_each_onnx_recipe_records_what_its_file_holds(digits_example, keypair, tmp_path):
    for recipe, precision in [("int8-dynamic-per-channel", "int8"), ("fp16", "fp16")]:
        result = build_example(
            digits_example,
            keypair[0],
            tmp_path / f"{recipe}.edgepkg",
            "x86-64-avx2",
            recipe=recipe,
            max_degradation=1.0,
        )

        assert result.manifest.model.precision == precision
        attempt = result.manifest.quantization.attempts[-1]
        assert (attempt.recipe, attempt.status) == (recipe, "passed")


def test_the_tflite_census_reads_the_flatbuffer(digits_tflite_example):
    census = TFLITE.weights(digits_tflite_example.model)

    assert census.total > 0
    assert census.count("int8") == 0
    assert census.precision == "fp32"
