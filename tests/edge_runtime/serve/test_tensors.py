"""Parsing OIP v2 infer requests (``oip_rest.parse_infer``, ``tensors``), without a server:
JSON and binary tensors, and the exact words of each refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_runtime.manifest import TensorSpec
from edge_runtime.serve.oip_rest import infer_response, metadata_json, parse_infer
from edge_runtime.serve.protocol import BadRequest, ModelMetadata
from edge_runtime.serve.tensors import datatype_of, tensor_metadata

META = ModelMetadata(
    name="m",
    platform="onnxruntime_onnx",
    inputs=[
        tensor_metadata(TensorSpec(name="x", dtype="float32", shape=["batch", 3])),
        tensor_metadata(TensorSpec(name="ids", dtype="int64", shape=["batch", 2])),
        tensor_metadata(TensorSpec(name="flag", dtype="bool", shape=[1])),
    ],
    outputs=[tensor_metadata(TensorSpec(name="y", dtype="float16", shape=["batch", 3]))],
)
X = np.arange(6, dtype=np.float32).reshape(2, 3)
IDS = np.array([[1, -2], [3, 2**40]], dtype=np.int64)


def tensor(name, datatype, shape, **fields):
    return {"name": name, "datatype": datatype, "shape": shape, **fields}


def json_request(**overrides) -> dict:
    inputs = {
        "x": tensor("x", "FP32", [2, 3], data=X.tolist()),
        "ids": tensor("ids", "INT64", [2, 2], data=IDS.ravel().tolist()),
        "flag": tensor("flag", "BOOL", [1], data=[True]),
    }
    inputs.update(overrides)
    return {"inputs": [value for value in inputs.values() if value is not None]}


def test_metadata_gives_oip_datatypes_and_minus_one_for_free_dimensions():
    described = metadata_json(META)

    assert described["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, 3]}
    assert described["inputs"][2]["datatype"] == "BOOL"
    assert described["outputs"][0]["datatype"] == "FP16"
    assert [datatype_of(name) for name in ("uint8", "int32", "float64")] == [
        "UINT8",
        "INT32",
        "FP64",
    ]


def test_json_tensors_nested_or_flat_parse_to_arrays():
    parsed = parse_infer(META, json.dumps(json_request()).encode(), None)

    np.testing.assert_array_equal(parsed.inputs["x"], X)
    np.testing.assert_array_equal(parsed.inputs["ids"], IDS)
    assert parsed.inputs["flag"].dtype == np.bool_ and parsed.inputs["flag"][0]
    assert parsed.outputs is None and parsed.binary_default is False


def test_binary_tensors_follow_the_json_header_in_input_order():
    raw_x, raw_ids = X.tobytes(), IDS.astype("<i8").tobytes()
    request = json_request(
        x=tensor("x", "FP32", [2, 3], parameters={"binary_data_size": len(raw_x)}),
        ids=tensor("ids", "INT64", [2, 2], parameters={"binary_data_size": len(raw_ids)}),
    )
    request["outputs"] = [{"name": "y", "parameters": {"binary_data": True}}]
    header = json.dumps(request).encode()

    parsed = parse_infer(META, header + raw_x + raw_ids, str(len(header)))

    np.testing.assert_array_equal(parsed.inputs["x"], X)
    np.testing.assert_array_equal(parsed.inputs["ids"], IDS)
    assert parsed.inputs["x"].flags.writeable  # a copy, not a view of the request body
    assert parsed.outputs == ["y"] and parsed.binary == {"y": True}


def test_the_answer_is_binary_only_for_the_outputs_that_ask():
    y = np.full((2, 3), 0.5, np.float16)
    request = json_request()
    parsed = parse_infer(META, json.dumps(request).encode(), None)
    as_json = infer_response(META, parsed, {"y": y})
    request["parameters"] = {"binary_data_output": True}
    request["id"] = "r-1"
    parsed = parse_infer(META, json.dumps(request).encode(), None)
    as_binary = infer_response(META, parsed, {"y": y})

    assert json.loads(as_json.body)["outputs"][0]["data"] == [0.5] * 6
    length = int(as_binary.headers["inference-header-content-length"])
    header = json.loads(as_binary.body[:length])
    assert header["id"] == "r-1"
    assert header["outputs"][0] == {
        "name": "y",
        "datatype": "FP16",
        "shape": [2, 3],
        "parameters": {"binary_data_size": 12},
    }
    np.testing.assert_array_equal(np.frombuffer(as_binary.body[length:], "<f2"), y.ravel())


@pytest.mark.parametrize(
    ("body", "header", "words"),
    [
        (b"", None, "not valid JSON"),
        (b'{"inputs": NaN}', None, "NaN is not a JSON value"),
        (b"\xff\xfe", None, "not valid UTF-8 (byte 0)"),
        (b'{"inputs": []}', None, 'needs "inputs": a list of tensors'),
        (json.dumps(json_request(x=None)).encode(), None, None),  # x missing: the host says
        (
            json.dumps(json_request(x=tensor("x", "FP32", [2, -3], data=[]))).encode(),
            None,
            "shape [2, -3] must be a list of sizes >= 0",
        ),
        (
            json.dumps(json_request(x=tensor("x", "FP32", [2, 4], data=[0] * 8))).encode(),
            None,
            "has size 4 on axis 1; the model takes [-1, 3]",
        ),
        (
            json.dumps(json_request(ids=tensor("ids", "INT64", [2, 2], data=[1.5] * 4))).encode(),
            None,
            "INT64 data must be integers",
        ),
        (
            json.dumps(json_request(ids=tensor("ids", "INT64", [1, 2], data=[2**70, 1]))).encode(),
            None,
            "a value does not fit INT64",
        ),
        (
            json.dumps(json_request(flag=tensor("flag", "BOOL", [1], data=[1]))).encode(),
            None,
            "BOOL data must be true or false",
        ),
        (
            json.dumps(json_request(x=tensor("x", "BYTES", [2, 3], data=[]))).encode(),
            None,
            "is FP32 in the model, not BYTES",
        ),
        (
            json.dumps(json_request(x=tensor("x", "FP32", [2, 3]))).encode(),
            None,
            'has neither "data" nor a binary_data_size',
        ),
        (
            json.dumps(
                json_request(x=tensor("x", "FP32", [2, 3], parameters={"binary_data_size": -1}))
            ).encode(),
            None,
            "binary_data_size must be a size in bytes",
        ),
        (b"{}", "abc", "Inference-Header-Content-Length 'abc' is not within"),
        (
            json.dumps({**json_request(), "parameters": {"binary_data_output": "yes"}}).encode(),
            None,
            "binary_data_output must be true or false",
        ),
        (b"[" * 100000 + b"]" * 100000, None, "nested too deeply"),
    ],
)
def test_malformed_requests_are_refused_with_what_is_wrong(body, header, words):
    if words is None:  # a missing input is for the model host to name (with constants)
        assert "x" not in parse_infer(META, body, header).inputs
        return
    with pytest.raises(BadRequest) as refused:
        parse_infer(META, body, header)

    assert words in str(refused.value)
    assert refused.value.status == 400
