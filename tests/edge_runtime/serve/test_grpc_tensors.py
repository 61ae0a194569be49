"""Tensor decoding and encoding of the gRPC front end, for the datatypes the digits models
do not exercise: integers in typed contents, FP16, BOOL, BYTES."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("grpc", reason="grpcio comes with the serve extra")

from edge_runtime.serve.grpc_v2 import decode_inputs, encode_output  # noqa: E402
from edge_runtime.serve.proto import grpc_predict_v2_pb2 as pb  # noqa: E402
from edge_runtime.serve.protocol import BadRequest  # noqa: E402


def typed(datatype: str, shape: list[int], field: str, values: list) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=shape)
    getattr(tensor.contents, field).extend(values)
    return request


def raw(datatype: str, shape: list[int], data: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[data])
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    return request


@pytest.mark.parametrize(
    ("datatype", "field", "values", "dtype"),
    [
        ("INT8", "int_contents", [-128, 0, 127], np.int8),
        ("UINT16", "uint_contents", [0, 65535, 7], np.uint16),
        ("INT64", "int64_contents", [-(2**40), 0, 2**40], np.int64),
        ("UINT64", "uint64_contents", [0, 2**63, 1], np.uint64),
        ("BOOL", "bool_contents", [True, False, True], np.bool_),
        ("FP64", "fp64_contents", [0.5, -1.25, 3.0], np.float64),
    ],
)
def test_typed_contents_decode_to_the_datatypes_numpy_dtype(datatype, field, values, dtype):
    arrays = decode_inputs(typed(datatype, [3], field, values), {"x": datatype})

    np.testing.assert_array_equal(arrays["x"], np.array(values, dtype=dtype))
    assert arrays["x"].dtype == dtype


def test_an_integer_outside_its_datatype_is_refused():
    with pytest.raises(BadRequest) as caught:
        decode_inputs(typed("INT8", [2], "int_contents", [1, 300]), {"x": "INT8"})

    assert str(caught.value) == "input 'x': a value lies outside INT8's range [-128, 127]"


def test_fp16_travels_only_raw():
    half = np.array([[0.5, 2.0]], dtype=np.float16)

    arrays = decode_inputs(raw("FP16", [1, 2], half.tobytes()), {"x": "FP16"})

    np.testing.assert_array_equal(arrays["x"], half)
    with pytest.raises(BadRequest) as caught:
        decode_inputs(typed("FP16", [1], "fp32_contents", [1.0]), {"x": "FP16"})
    assert str(caught.value) == "input 'x': FP16 data travels only in raw_input_contents"


def test_bytes_round_trip_raw_and_typed():
    items = [b"", b"hello", "caf\u00e9".encode()]
    wire = b"".join(len(item).to_bytes(4, "little") + item for item in items)

    from_raw = decode_inputs(raw("BYTES", [3], wire), {"x": "BYTES"})["x"]
    from_typed = decode_inputs(typed("BYTES", [3], "bytes_contents", items), {"x": "BYTES"})["x"]

    assert list(from_raw) == list(from_typed) == items
    assert encode_output("y", from_raw) == ("BYTES", wire)
    assert encode_output("y", np.array(["caf\u00e9"])) == ("BYTES", wire[-9:])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x05\x00", "input 'x': BYTES data ends inside an element's length"),
        (b"\x09\x00\x00\x00abc", "input 'x': a BYTES element claims 9 bytes, past the data's end"),
    ],
)
def test_truncated_bytes_are_refused(data, message):
    with pytest.raises(BadRequest) as caught:
        decode_inputs(raw("BYTES", [1], data), {"x": "BYTES"})

    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("value", "datatype"),
    [
        (np.arange(6, dtype=np.float32).reshape(2, 3), "FP32"),
        (np.arange(6, dtype=">i8").reshape(3, 2), "INT64"),  # big-endian goes out little
        (np.array([True, False]), "BOOL"),
        (np.arange(4, dtype=np.uint8)[::2], "UINT8"),  # not contiguous
    ],
)
def test_outputs_encode_little_endian_row_major(value, datatype):
    name, data = encode_output("y", value)

    assert name == datatype
    decoded = np.frombuffer(data, dtype=np.dtype(value.dtype).newbyteorder("<"))
    np.testing.assert_array_equal(decoded.reshape(value.shape), value)


def test_an_input_given_twice_is_refused():
    request = raw("FP32", [1], bytes(4))
    request.inputs.add(name="x", datatype="FP32", shape=[1])
    request.raw_input_contents.append(bytes(4))

    with pytest.raises(BadRequest) as caught:
        decode_inputs(request, {"x": "FP32"})

    assert str(caught.value) == "input 'x' is given twice"
