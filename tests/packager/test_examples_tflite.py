"""Examples converted to TFLite by litert-torch: the digits CNN and MiniLM.

The converted model must keep the ONNX model's names and numbers, so one eval .npz serves
both. The first run builds the converter venv (2.1 GiB, minutes); later runs reuse it.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.numerics import assert_close_across_kernels

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
    assert_close_across_kernels(got, expected)
    assert (got.argmax(axis=1) == labels).mean() > 0.9


MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SENTENCES = 8


def test_minilm_signature_has_the_onnx_names_and_dtypes(minilm_tflite_example):
    interpreter, runner = _signature_runner(minilm_tflite_example.model)

    signature = interpreter.get_signature_list()["serving_default"]
    inputs, outputs = runner.get_input_details(), runner.get_output_details()

    assert (sorted(signature["inputs"]), signature["outputs"]) == (
        sorted(MINILM_INPUTS),
        ["sentence_embedding"],
    )
    for name in MINILM_INPUTS:
        assert (inputs[name]["shape"].tolist(), inputs[name]["dtype"]) == ([1, 128], np.int64)
    embedding = outputs["sentence_embedding"]
    assert (embedding["shape"].tolist(), embedding["dtype"]) == ([1, 384], np.float32)


def test_minilm_embeddings_match_the_onnx_model(minilm_example, minilm_tflite_example):
    with np.load(minilm_tflite_example.eval) as data:
        feeds = {name: data[name][:SENTENCES] for name in MINILM_INPUTS}
    session = ort.InferenceSession(str(minilm_example.model), providers=["CPUExecutionProvider"])
    _, runner = _signature_runner(minilm_tflite_example.model)

    expected = session.run(["sentence_embedding"], feeds)[0]
    rows = [{name: array[i : i + 1] for name, array in feeds.items()} for i in range(SENTENCES)]
    got = np.concatenate([runner(**row)["sentence_embedding"] for row in rows])

    cosine = (got * expected).sum(axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    )
    assert minilm_tflite_example.eval == minilm_example.eval
    assert cosine.min() > 0.9999
