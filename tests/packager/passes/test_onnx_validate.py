import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from packager.errors import ModelValidationError
from packager.passes import ModelArtifact, OnnxValidate, PassContext
from packager.profiles import load_profile


def _matmul_model(opset: int = 17) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.ones((4, 2), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _validate(path, tmp_path):
    ctx = PassContext(workdir=tmp_path / f"work-{path.stem}", profile=load_profile("x86-64-avx2"))
    output, _ = OnnxValidate().run(ModelArtifact(path, "onnx"), ctx)
    return output


def _with_external_location(tmp_path, location: str):
    """Save the weight as external data, then point its location at ``location``."""
    model = _matmul_model()
    onnx.save(
        model,
        str(tmp_path / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(model, str(tmp_path / "model.onnx"))
    return tmp_path / "model.onnx"


def test_a_valid_model_reports_its_signature(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_matmul_model(), str(path))

    output = _validate(path, tmp_path)

    assert output.metrics["opset"] == 17
    assert [spec.describe() for spec in output.metrics["inputs"]] == ["x: float32[batch, 4]"]


def test_external_data_next_to_the_model_is_accepted(tmp_path):
    path = _with_external_location(tmp_path, "weights.bin")

    output = _validate(path, tmp_path)

    assert [p.name for p in output.metrics["external_data"]] == ["weights.bin"]


@pytest.mark.parametrize(
    "location, message",
    [("/etc/passwd", "absolute paths"), ("../weights.bin", "outside the model's folder")],
)
def test_external_data_outside_the_folder_is_refused(tmp_path, location, message):
    folder = tmp_path / "model"
    folder.mkdir()
    path = _with_external_location(folder, "weights.bin")
    (folder / "weights.bin").rename(tmp_path / "weights.bin")
    _with_external_location(folder, location)

    with pytest.raises(ModelValidationError, match=message):
        _validate(path, tmp_path)


def test_external_data_through_a_link_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    path = _with_external_location(folder, "weights.bin")
    (folder / "weights.bin").rename(tmp_path / "real.bin")
    os.symlink(tmp_path / "real.bin", folder / "weights.bin")

    with pytest.raises(ModelValidationError, match="link"):
        _validate(path, tmp_path)


def test_opset_11_is_accepted_for_conversion(tmp_path):
    path = tmp_path / "old.onnx"
    onnx.save(_matmul_model(opset=11), str(path))

    output = _validate(path, tmp_path)

    assert output.metrics["opset"] == 11  # OnnxOpsetUpgrade converts it next


def test_an_opset_too_old_to_convert_is_refused_with_a_fix(tmp_path):
    path = tmp_path / "old.onnx"
    onnx.save(_matmul_model(opset=6), str(path))

    with pytest.raises(ModelValidationError, match="Re-export with opset 13 or newer"):
        _validate(path, tmp_path)


def test_checker_failure_and_garbage_are_refused(tmp_path):
    broken = _matmul_model()
    broken.graph.node[0].input[1] = "missing"
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    (tmp_path / "garbage.onnx").write_bytes(b"\x00not a protobuf at all")

    with pytest.raises(ModelValidationError, match="ONNX checker"):
        _validate(tmp_path / "broken.onnx", tmp_path)
    with pytest.raises(ModelValidationError):
        _validate(tmp_path / "garbage.onnx", tmp_path)
