"""Calibration method as a recipe option: min-max, percentile and entropy reach ONNX Runtime."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from packager.formats.onnx import PIPELINE
from packager.passes import ModelArtifact, OnnxStaticQuantize, PassContext
from packager.profiles import load_profile
from tests.packager.passes.test_onnx_mixed import attention_data, attention_model


def activation_scales(path) -> dict[str, float]:
    """The per-tensor scale of every quantized activation in a QDQ file."""
    model = onnx.load(str(path))
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    return {
        node.input[0]: float(initializers[node.input[1]])
        for node in model.graph.node
        if node.op_type == "QuantizeLinear" and node.input[0] not in initializers
    }


@pytest.fixture(scope="module")
def scales_by_method(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    model = attention_model(folder / "attention.onnx")
    found = {}
    for recipe in ("int8-static-qdq-per-channel", "int8-static-percentile"):
        [step] = PIPELINE.recipe(recipe).steps
        ctx = PassContext(
            workdir=folder / recipe,
            profile=load_profile("x86-64-avx2"),
            calibration=attention_data(32, 1),
        )
        output, record = OnnxStaticQuantize(dict(step.config)).run(
            ModelArtifact(model, "onnx"), ctx
        )
        found[record.config["calibrate_method"]] = activation_scales(output.artifact.path)
    return found


def test_each_recipe_names_its_method():
    methods = [
        dict(PIPELINE.recipe(name).steps[0].config).get("calibrate_method", "minmax")
        for name in ("int8-static-qdq-per-channel", "int8-static-percentile", "int8-static-entropy")
    ]
    assert methods == ["minmax", "percentile", "entropy"]
    assert PIPELINE.recipe("int8-static-percentile").needs_calibration


def test_the_method_changes_the_scales_in_the_file(scales_by_method):
    minmax, percentile = scales_by_method["minmax"], scales_by_method["percentile"]
    assert minmax.keys() == percentile.keys()
    differs = [name for name in minmax if not np.isclose(minmax[name], percentile[name])]
    assert differs, "percentile calibration wrote the min-max scales"
    # A percentile range clips the outliers a min-max range keeps, never the reverse.
    assert all(percentile[name] <= minmax[name] * 1.0001 for name in minmax)
    # The -1e9 mask fill: min-max gives its tensor a scale near 1e9 / 255.
    assert minmax["masked"] > 1e6


def test_entropy_reaches_onnxruntime_and_stdout_stays_clean(tmp_path, capsys):
    """ONNX Runtime's entropy calibrator (128 histogram bins, 128 quantized) often lands on
    the min-max range of small data, so the scales cannot tell; its own report can. That
    report is printed, and stdout belongs to the CLI: it becomes one progress line."""
    model = attention_model(tmp_path / "attention.onnx")
    [step] = PIPELINE.recipe("int8-static-entropy").steps
    ctx = PassContext(
        workdir=tmp_path / "work",
        profile=load_profile("x86-64-avx2"),
        calibration=attention_data(8, 1),
    )
    lines = []
    ctx.progress = lines.append

    output, _ = OnnxStaticQuantize(dict(step.config)).run(ModelArtifact(model, "onnx"), ctx)

    assert capsys.readouterr().out == ""
    assert any(line.startswith("calibration: entropy thresholds for ") for line in lines)
    assert activation_scales(output.artifact.path)
