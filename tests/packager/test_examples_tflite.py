"""The digits CNN converted to TFLite by litert-torch (packager/examples/digits.py).

The converted model must keep the ONNX model's names and numbers, so one eval .npz serves
both. The first run builds the converter venv (2.1 GiB, minutes); later runs reuse it.
"""

from __future__ import annotations

import numpy as np
import pytest

litert = pytest.importorskip("ai_edge_litert.interpreter")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.slow

SAMPLES = 50


def _signature_runner(model):
    interpreter = litert.Interpreter(model_path=str(model))
    return interpreter, interpreter.get_signature_runner("serving_default")


def test_signature_has_the_onnx_names_and_a_batch_of_one(digits_tflite_example):
    interpreter, runner = _signature_runner(digits_tflite_example.model)

    signatures = interpreter.get_signature_list()
    image = runner.get_input_details()["image"]
    logits = runner.get_output_details()["logits"]

    assert signatures == {"serving_default": {"inputs": ["image"], "outputs": ["logits"]}}
    assert (image["shape"].tolist(), image["dtype"]) == ([1, 1, 8, 8], np.float32)
    assert (logits["shape"].tolist(), logits["dtype"]) == ([1, 10], np.float32)


def test_outputs_match_the_onnx_model(digits_example, digits_tflite_example):
    with np.load(digits_tflite_example.eval) as data:
        images, labels = data["image"][:SAMPLES], data["labels"][:SAMPLES]
    session = ort.InferenceSession(str(digits_example.model), providers=["CPUExecutionProvider"])
    _, runner = _signature_runner(digits_tflite_example.model)

    expected = session.run(["logits"], {"image": images})[0]
    got = np.concatenate([runner(image=images[i : i + 1])["logits"] for i in range(SAMPLES)])

    assert digits_tflite_example.eval == digits_example.eval
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert (got.argmax(axis=1) == labels).mean() > 0.9
