"""Open Inference Protocol v2 over REST, against a real ``edge-runtime serve`` process.

``tritonclient.http`` (a client nobody here wrote) checks readiness and metadata and runs
inference with binary tensors on the digits CNN (ONNX and TFLite) and MiniLM; the outputs
must equal ``Runtime.run`` on the same inputs. Raw requests then feed the server garbage:
each answer is a 4xx JSON error naming the problem, and the next good request succeeds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from edge_runtime import Runtime

from .conftest import Launcher, call

MAX_BODY = 1024 * 1024


@pytest.fixture(scope="module")
def server(cnn_bundle, tflite_x86_bundle, minilm_bundle, keypair, tmp_path_factory):
    """One server for the module: digits (ONNX, by manifest name), tflite=..., minilm."""
    launcher = Launcher(tmp_path_factory.mktemp("oip-rest"))
    served = launcher.start(
        cnn_bundle,
        f"tflite={tflite_x86_bundle}",
        f"minilm={minilm_bundle}",
        "--pubkey",
        keypair[1],
        "--max-body-bytes",
        MAX_BODY,
    )
    yield served
    try:
        assert served.stop() == 0, served.log[-4000:]
    finally:
        launcher.kill_all()


@pytest.fixture(scope="module")
def client(server):
    return triton_http.InferenceServerClient(server.url.removeprefix("http://"))


def digits_inputs(digits_example, count: int) -> dict[str, np.ndarray]:
    with np.load(digits_example.eval) as data:
        return {"image": data["image"][:count]}


def minilm_inputs(minilm_example, count: int) -> dict[str, np.ndarray]:
    with np.load(minilm_example.eval) as data:
        return {name: data[name][:count] for name in data.files}


CASES = {
    # model served as, its bundle fixture, inputs, samples per request
    "digits-cnn": ("cnn_bundle", "digits_example", digits_inputs, 5),
    "tflite": ("tflite_x86_bundle", "digits_tflite_example", digits_inputs, 1),
    "minilm": ("minilm_bundle", "minilm_example", minilm_inputs, 2),
}


def test_server_and_models_are_live_ready_and_described(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    for name in CASES:
        assert client.is_model_ready(name)
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]

    digits = client.get_model_metadata("digits-cnn")
    minilm = client.get_model_metadata("minilm")
    tflite = client.get_model_metadata("tflite")

    assert digits["platform"] == "onnxruntime_onnx"
    assert digits["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert digits["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert tflite["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8]}]
    assert {t["name"]: t["datatype"] for t in minilm["inputs"]} == {
        "input_ids": "INT64",
        "attention_mask": "INT64",
        "token_type_ids": "INT64",
    }
    assert minilm["inputs"][0]["shape"] == [-1, -1]
    assert minilm["outputs"] == [
        {"name": "sentence_embedding", "datatype": "FP32", "shape": [-1, 384]}
    ]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", list(CASES))
def test_tritonclient_inference_equals_runtime_run(request, client, keypair, model, binary):
    bundle_fixture, example_fixture, make_inputs, count = CASES[model]
    bundle = request.getfixturevalue(bundle_fixture)
    inputs = make_inputs(request.getfixturevalue(example_fixture), count)
    with Runtime.open(bundle, keypair[1]) as runtime:
        expected = runtime.run(inputs)
    tensors = []
    for name, value in inputs.items():
        datatype = "FP32" if value.dtype == np.float32 else "INT64"
        tensor = triton_http.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value, binary_data=binary)
        tensors.append(tensor)
    outputs = (
        None
        if binary
        else [triton_http.InferRequestedOutput(name, binary_data=False) for name in expected]
    )

    result = client.infer(model, tensors, outputs=outputs)

    answer = result.get_response()
    for name, value in expected.items():
        got = result.as_numpy(name)
        assert got.dtype == value.dtype and got.shape == value.shape
        np.testing.assert_allclose(got, value, rtol=1e-6, atol=1e-6)
        (described,) = [o for o in answer["outputs"] if o["name"] == name]
        assert ("binary_data_size" in described.get("parameters", {})) == binary


def post(server, model: str, body, headers: dict[str, str] | None = None):
    return call("POST", f"{server.url}/v2/models/{model}/infer", body, headers)


def digits_json(data=None, **overrides) -> dict:
    tensor = {
        "name": "image",
        "datatype": "FP32",
        "shape": [1, 1, 8, 8],
        "data": data if data is not None else [0.5] * 64,
    }
    return {"inputs": [{**tensor, **overrides}]}


def binary_body(header: dict, raw: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + raw, {"Inference-Header-Content-Length": str(len(text))}


RAW_IMAGE = np.full((1, 1, 8, 8), 0.5, np.float32).tobytes()


def bad_requests():
    """(id, model, body, headers, status, words the error must hold)."""
    sized = {"parameters": {"binary_data_size": len(RAW_IMAGE)}}
    cases = [
        ("malformed-json", "digits-cnn", b'{"inputs": [', None, 400, "not valid JSON"),
        ("not-an-object", "digits-cnn", b"[1, 2]", None, 400, "must be a JSON object"),
        ("unknown-model", "nope", json.dumps(digits_json()).encode(), None, 404, "no model 'nope'"),
        (
            "llm-style-datatype",
            "digits-cnn",
            json.dumps(digits_json(datatype="FLOAT32")).encode(),
            None,
            400,
            "datatype 'FLOAT32' is not an Open Inference Protocol datatype",
        ),
        (
            "wrong-datatype",
            "digits-cnn",
            json.dumps(digits_json(datatype="FP64")).encode(),
            None,
            400,
            "is FP32 in the model, not FP64",
        ),
        (
            "shape-data-mismatch",
            "digits-cnn",
            json.dumps(digits_json(data=[0.5] * 10)).encode(),
            None,
            400,
            "10 values of data, but shape [1, 1, 8, 8] needs 64",
        ),
        (
            "wrong-rank",
            "digits-cnn",
            json.dumps(digits_json(shape=[1, 64])).encode(),
            None,
            400,
            "of rank 2; the model takes rank 4",
        ),
        (
            "unknown-input",
            "digits-cnn",
            json.dumps(digits_json(name="pixels")).encode(),
            None,
            400,
            "has no input 'pixels'; its inputs are image",
        ),
        (
            "strings-as-floats",
            "digits-cnn",
            json.dumps(digits_json(data=["a"] * 64)).encode(),
            None,
            400,
            "FP32 data must be numbers",
        ),
        (
            "invalid-utf8",
            "digits-cnn",
            b'{"inputs": [{"name": "im\xffage"}]}',
            None,
            400,
            "not valid UTF-8",
        ),
        (
            "binary-header-beyond-body",
            "digits-cnn",
            b'{"inputs": []}',
            {"Inference-Header-Content-Length": "99999"},
            400,
            "Inference-Header-Content-Length '99999' is not within the body's 14 bytes",
        ),
        (
            "binary-size-beyond-body",
            "digits-cnn",
            *binary_body(
                {"inputs": [{**digits_json()["inputs"][0], "data": None, **sized}]},
                RAW_IMAGE[:100],
            ),
            400,
            "binary_data_size 256 goes beyond the body: 100 bytes of binary data are left",
        ),
        (
            "binary-length-mismatch",
            "digits-cnn",
            *binary_body(
                {"inputs": [{**digits_json()["inputs"][0], "parameters": {"binary_data_size": 8}}]},
                RAW_IMAGE[:8],
            ),
            400,
            "8 bytes of data, but shape [1, 1, 8, 8] of FP32 needs 256",
        ),
        (
            "unclaimed-binary-bytes",
            "digits-cnn",
            *binary_body(
                {"inputs": [{**digits_json()["inputs"][0], **sized}]}, RAW_IMAGE + b"\0" * 4
            ),
            400,
            "4 bytes of binary data follow the inputs",
        ),
        (
            "unknown-output",
            "digits-cnn",
            json.dumps({**digits_json(), "outputs": [{"name": "probs"}]}).encode(),
            None,
            400,
            "has no output 'probs'; its outputs are logits",
        ),
        (
            "oversize-body",
            "digits-cnn",
            b"x" * (MAX_BODY + 1),
            None,
            413,
            f"this server takes at most {MAX_BODY} (--max-body-bytes)",
        ),
    ]
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


@pytest.mark.parametrize(("model", "body", "headers", "status", "words"), bad_requests())
def test_bad_request_is_a_json_error_and_the_next_request_succeeds(
    server, model, body, headers, status, words
):
    answer = post(server, model, body, headers)

    assert answer.status == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert words in answer.json()["error"]
    good = post(server, "digits-cnn", json.dumps(digits_json()).encode())
    assert good.status == 200, good.text
    assert good.json()["outputs"][0]["shape"] == [1, 10]


def test_oversize_body_without_content_length_is_refused_as_it_arrives(server):
    def chunks():
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"x" * 65536

    answer = post(server, "digits-cnn", chunks())

    assert answer.status == 413
    assert "more than 1048576 bytes" in answer.json()["error"]
    assert post(server, "digits-cnn", json.dumps(digits_json()).encode()).status == 200


def test_tritonclient_raises_the_servers_message(client):
    tensor = triton_http.InferInput("image", [1, 1, 8, 9], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 8, 9), np.float32))

    with pytest.raises(InferenceServerException, match="size 9 on axis 3"):
        client.infer("digits-cnn", [tensor])


def test_outputs_are_binary_per_output_or_for_the_whole_request(server):
    json_output = {"outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}
    per_output = {"outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}
    whole = {"parameters": {"binary_data_output": True}}

    as_json = post(server, "digits-cnn", json.dumps({**digits_json(), **json_output}).encode())
    binary = post(server, "digits-cnn", json.dumps({**digits_json(), **per_output}).encode())
    request_wide = post(server, "digits-cnn", json.dumps({**digits_json(), **whole}).encode())

    assert "inference-header-content-length" not in as_json.headers
    expected = np.asarray(as_json.json()["outputs"][0]["data"], np.float32)
    for answer in (binary, request_wide):
        length = int(answer.headers["inference-header-content-length"])
        header = json.loads(answer.content[:length])
        assert header["outputs"][0]["parameters"] == {"binary_data_size": 40}
        np.testing.assert_array_equal(np.frombuffer(answer.content[length:], "<f4"), expected)


def test_versioned_paths_and_unknown_routes(server):
    assert call("GET", f"{server.url}/v2/models/digits-cnn/versions/1/ready").status == 200
    missing = call("GET", f"{server.url}/v2/models/digits-cnn/versions/7")
    unknown = call("GET", f"{server.url}/v3/anything")
    wrong_method = call("GET", f"{server.url}/v2/models/digits-cnn/infer")

    assert missing.status == 404
    assert "has no version '7'" in missing.json()["error"]
    assert unknown.status == 404
    assert "no route GET /v3/anything" in unknown.json()["error"]
    assert wrong_method.status == 405
    assert wrong_method.headers["content-type"] == "application/json"


def test_metrics_count_requests_errors_and_batches(server):
    post(server, "digits-cnn", json.dumps(digits_json()).encode())
    post(server, "digits-cnn", b"{")

    text = call("GET", f"{server.url}/metrics").text

    assert 'edgepack_serve_requests_total{code="200",model="digits-cnn",route="infer"}' in text
    assert 'edgepack_serve_errors_total{code="400",model="digits-cnn"}' in text
    assert 'edgepack_serve_batch_size_count{model="digits-cnn"}' in text
    assert 'edgepack_serve_request_seconds_bucket{le="0.1",model="digits-cnn"}' in text
    assert 'edgepack_serve_queue_depth{model="minilm"}' in text
