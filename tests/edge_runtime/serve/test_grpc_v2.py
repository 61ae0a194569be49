"""The gRPC Open Inference Protocol front end, called by tritonclient.grpc (a client nobody
here wrote) against a real server on a free port, serving real bundles: the digits CNN as
ONNX and as TFLite. Malformed requests the client library would refuse to build go
through the protocol's own stub."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

grpc = pytest.importorskip("grpc", reason="grpcio comes with the serve extra")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient is a dev client")

from tritonclient.utils import InferenceServerException  # noqa: E402

from edge_runtime import Runtime  # noqa: E402
from edge_runtime.errors import EdgeRuntimeError, InputSignatureError  # noqa: E402
from edge_runtime.serve.grpc_v2 import start_grpc_server  # noqa: E402
from edge_runtime.serve.proto import grpc_predict_v2_pb2 as pb  # noqa: E402
from edge_runtime.serve.proto import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402
from edge_runtime.serve.protocol import (  # noqa: E402
    BadRequest,
    ModelMetadata,
    ModelNotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    ServeError,
    TensorMetadata,
    Unauthorized,
)

API_KEY = "k3y-for-tests"
OIP_DATATYPE = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32"}


class RuntimeModel:
    """A TensorModel over a real Runtime: one inference at a time, as the serve host's
    queue would feed it."""

    def __init__(self, name: str, runtime: Runtime) -> None:
        self.name = name
        self.runtime = runtime
        self.calls = 0
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return True

    def metadata(self) -> ModelMetadata:
        def described(specs) -> list[TensorMetadata]:
            return [
                TensorMetadata(
                    spec.name,
                    OIP_DATATYPE[spec.dtype],
                    [dim if isinstance(dim, int) else -1 for dim in spec.shape],
                )
                for spec in specs
            ]

        manifest = self.runtime.manifest
        platform = {"onnx": "onnxruntime_onnx", "tflite": "tflite"}[manifest.model.format]
        return ModelMetadata(
            self.name,
            platform,
            inputs=described(manifest.inputs),
            outputs=described(manifest.outputs),
        )

    def infer(self, inputs: dict[str, Any], outputs: list[str] | None = None) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
            try:
                results = self.runtime.run(inputs)
            except InputSignatureError as exc:
                raise BadRequest(str(exc)) from None
        return {name: results[name] for name in outputs} if outputs else results


class RefusingModel:
    """A model that refuses every inference with a given error (the seam's contract)."""

    def __init__(self, error: Exception, ready: bool = True) -> None:
        self.name = "refusing"
        self.error = error
        self._ready = ready

    @property
    def ready(self) -> bool:
        return self._ready

    def metadata(self) -> ModelMetadata:
        return ModelMetadata(
            self.name,
            "onnxruntime_onnx",
            inputs=[TensorMetadata("x", "FP32", [-1])],
            outputs=[TensorMetadata("y", "FP32", [-1])],
        )

    def infer(self, inputs, outputs=None):
        raise self.error


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def digits(cnn_bundle, tflite_x86_bundle, keypair):
    with (
        Runtime.open(cnn_bundle, keypair[1]) as onnx_runtime,
        Runtime.open(tflite_x86_bundle, keypair[1]) as tflite_runtime,
    ):
        yield {
            "digits": RuntimeModel("digits", onnx_runtime),
            "digits-tflite": RuntimeModel("digits-tflite", tflite_runtime),
        }


@pytest.fixture(scope="module")
def images(digits_example) -> np.ndarray:
    return np.load(digits_example.eval)["image"][:16]


def serve(models, **options):
    port = free_port()
    server = start_grpc_server(models, "127.0.0.1", port, **options)
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(digits):
    server, url = serve(digits)
    yield url
    server.stop(None)


@pytest.fixture
def client(server):
    triton = grpcclient.InferenceServerClient(url=server)
    yield triton
    triton.close()


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def infer(client, model: str, image: np.ndarray, **options) -> np.ndarray:
    tensor = grpcclient.InferInput("image", list(image.shape), "FP32")
    tensor.set_data_from_numpy(image)  # binary: raw_input_contents
    wanted = [grpcclient.InferRequestedOutput("logits")]
    return client.infer(model, [tensor], outputs=wanted, **options).as_numpy("logits")


def raw_request(model: str, datatype: str, shape: list[int], data: bytes) -> Any:
    request = pb.ModelInferRequest(model_name=model, raw_input_contents=[data])
    request.inputs.add(name="image", datatype=datatype, shape=shape)
    return request


def refused(call, *args, **kwargs) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return caught.value.status(), caught.value.message()


def grpc_refused(call, request, **kwargs) -> tuple[Any, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, **kwargs)
    return caught.value.code(), caught.value.details()


def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits-tflite")
    assert client.is_model_ready("digits", model_version="1")
    meta = client.get_server_metadata()
    assert meta.name == "edge-runtime"
    assert meta.version


@pytest.mark.parametrize(
    ("model", "platform", "image_shape", "logits_shape"),
    [
        ("digits", "onnxruntime_onnx", [-1, 1, 8, 8], [-1, 10]),
        ("digits-tflite", "tflite", [1, 1, 8, 8], [1, 10]),
    ],
)
def test_model_metadata(client, model, platform, image_shape, logits_shape):
    meta = client.get_model_metadata(model)

    assert (meta.name, meta.platform, list(meta.versions)) == (model, platform, ["1"])
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("image", "FP32", image_shape)
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("logits", "FP32", logits_shape)
    ]


@pytest.mark.parametrize("model", ["digits", "digits-tflite"])
def test_binary_inference_equals_runtime_run(client, digits, images, model):
    runtime = digits[model].runtime

    for image in images[:8]:
        batch = image[None]
        served = infer(client, model, batch)

        np.testing.assert_array_equal(served, runtime.run({"image": batch})["logits"])


def test_a_batch_and_all_outputs_when_none_are_named(client, digits, images):
    tensor = grpcclient.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)

    result = client.infer("digits", [tensor], request_id="req-7")

    expected = digits["digits"].runtime.run({"image": images})["logits"]
    np.testing.assert_array_equal(result.as_numpy("logits"), expected)
    assert result.get_response().id == "req-7"
    assert result.get_response().model_version == "1"


def test_typed_contents_equal_raw(stub, digits, images):
    """Clients may send typed contents (fp32_contents) instead of raw bytes."""
    request = pb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="image", datatype="FP32", shape=[2, 1, 8, 8])
    tensor.contents.fp32_contents.extend(images[:2].reshape(-1).tolist())

    response = stub.ModelInfer(request)

    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 10)
    expected = digits["digits"].runtime.run({"image": images[:2]})["logits"]
    np.testing.assert_array_equal(logits, expected)
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("logits", "FP32", [2, 10])
    ]


def test_concurrent_clients_each_get_their_own_answer(server, digits, images):
    runtime = digits["digits-tflite"].runtime
    expected = [runtime.run({"image": image[None]})["logits"] for image in images]

    def one_client(offset: int) -> list[np.ndarray]:
        triton = grpcclient.InferenceServerClient(url=server)
        try:
            order = [(offset + step) % len(images) for step in range(len(images))]
            return [(index, infer(triton, "digits-tflite", images[index][None])) for index in order]
        finally:
            triton.close()

    with ThreadPoolExecutor(8) as pool:
        answers = [answer for batch in pool.map(one_client, range(8)) for answer in batch]

    assert len(answers) == 8 * len(images)
    for index, logits in answers:
        np.testing.assert_array_equal(logits, expected[index])


# Each bad request gets a status that names the problem; the next good one still succeeds.
def test_unknown_model_is_not_found(client, images):
    status, message = refused(infer, client, "digitz", images[:1])
    assert status == "StatusCode.NOT_FOUND"
    assert message == "unknown model 'digitz'; this server serves: digits, digits-tflite"
    assert refused(client.is_model_ready, "digitz")[0] == "StatusCode.NOT_FOUND"
    assert refused(client.get_model_metadata, "digitz")[0] == "StatusCode.NOT_FOUND"

    status, message = refused(client.get_model_metadata, "digits", model_version="2")
    assert status == "StatusCode.NOT_FOUND"
    assert "has no version '2'; its versions: 1" in message
    assert infer(client, "digits", images[:1]).shape == (1, 10)


def test_wrong_datatype_for_the_model(client, images):
    tensor = grpcclient.InferInput("image", [1, 1, 8, 8], "FP64")
    tensor.set_data_from_numpy(images[:1].astype(np.float64))

    status, message = refused(client.infer, "digits", [tensor])

    assert status == "StatusCode.INVALID_ARGUMENT"
    assert message == "input 'image' is FP32, not FP64"
    assert infer(client, "digits", images[:1]).shape == (1, 10)


@pytest.mark.parametrize(
    ("datatype", "shape", "nbytes", "message"),
    [
        (
            "FLOAT32",
            [1, 1, 8, 8],
            256,
            "input 'image': unknown datatype 'FLOAT32'; the protocol's datatypes are BOOL, "
            "UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, FP32, FP64, BYTES",
        ),
        (
            "FP32",
            [1, 1, 8, 8],
            252,
            "input 'image': shape [1, 1, 8, 8] holds 64 FP32 elements, but 252 bytes came "
            "(4 per element); the data must be the whole tensor, flattened in row-major order",
        ),
        (
            "FP32",
            [2, 1, 8, 8],
            256,
            "input 'image': shape [2, 1, 8, 8] holds 128 FP32 elements, but 256 bytes came "
            "(4 per element); the data must be the whole tensor, flattened in row-major order",
        ),
        ("FP32", [1, -1, 8, 8], 256, "input 'image': shape [1, -1, 8, 8] has a negative size"),
    ],
)
def test_malformed_tensors_are_invalid_argument(stub, images, datatype, shape, nbytes, message):
    request = raw_request("digits", datatype, shape, bytes(nbytes))

    code, details = grpc_refused(stub.ModelInfer, request)

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == message
    good = raw_request("digits", "FP32", [1, 1, 8, 8], images[:1].tobytes())
    assert len(stub.ModelInfer(good).raw_output_contents[0]) == 40


def test_requests_the_model_refuses_are_invalid_argument(stub, client, images):
    """Problems only the model sees (a fixed size, a missing input) come back with the
    runtime's message, which names the expected signature."""
    request = raw_request("digits-tflite", "FP32", [2, 1, 8, 8], images[:2].tobytes())
    code, details = grpc_refused(stub.ModelInfer, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == (
        "input 'image' has size 2 on axis 0, needs 1; expected image: float32[1, 1, 8, 8]"
    )

    code, details = grpc_refused(stub.ModelInfer, pb.ModelInferRequest(model_name="digits"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("missing inputs ['image'], unknown inputs []")

    request = raw_request("digits", "FP32", [1, 1, 8, 8], images[:1].tobytes())
    request.inputs[0].name = "pixels"
    code, details = grpc_refused(stub.ModelInfer, request)
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "the model has no input 'pixels'; its inputs: image",
    )

    request = raw_request("digits", "FP32", [1, 1, 8, 8], images[:1].tobytes())
    request.outputs.add(name="probabilities")
    code, details = grpc_refused(stub.ModelInfer, request)
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "model 'digits' has no output 'probabilities'; its outputs: logits",
    )
    assert infer(client, "digits-tflite", images[:1]).shape == (1, 10)


def test_raw_and_typed_contents_must_agree_with_the_inputs(stub, images):
    request = raw_request("digits", "FP32", [1, 1, 8, 8], images[:1].tobytes())
    request.raw_input_contents.append(b"extra")
    code, details = grpc_refused(stub.ModelInfer, request)
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "raw_input_contents has 2 entries for 1 inputs: send one per input, in the order of inputs",
    )

    request = pb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="image", datatype="FP32", shape=[1, 1, 8, 8])
    tensor.contents.int_contents.extend([0] * 64)  # the wrong field for FP32
    code, details = grpc_refused(stub.ModelInfer, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(
        "input 'image': shape [1, 1, 8, 8] holds 64 FP32 elements, but fp32_contents has 0"
    )


def test_an_oversize_message_is_refused_before_decoding(digits, images):
    server, url = serve(digits, max_message_bytes=4096)
    try:
        with grpc.insecure_channel(url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            big = raw_request("digits", "FP32", [32, 1, 8, 8], np.zeros(2048, "<f4").tobytes())

            code, details = grpc_refused(stub.ModelInfer, big)

            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "4096" in details
            good = raw_request("digits", "FP32", [1, 1, 8, 8], images[:1].tobytes())
            assert len(stub.ModelInfer(good).raw_output_contents) == 1
    finally:
        server.stop(None)


@pytest.fixture(scope="module")
def keyed_server(digits):
    server, url = serve(digits, api_key=API_KEY)
    yield url
    server.stop(None)


def test_api_key_guards_everything_but_live_and_ready(keyed_server, images):
    client = grpcclient.InferenceServerClient(url=keyed_server)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()

        status, message = refused(infer, client, "digits", images[:1])
        assert status == "StatusCode.UNAUTHENTICATED"
        assert message == (
            "this server needs an API key: send the metadata 'authorization: Bearer <key>' "
            "with the server's API key"
        )
        for call in (client.is_model_ready, client.get_model_metadata):
            assert refused(call, "digits")[0] == "StatusCode.UNAUTHENTICATED"
        assert refused(client.get_server_metadata)[0] == "StatusCode.UNAUTHENTICATED"

        wrong = {"authorization": "Bearer nope"}
        status, message = refused(infer, client, "digits", images[:1], headers=wrong)
        assert status == "StatusCode.UNAUTHENTICATED"
        assert message.startswith("wrong API key")

        right = {"authorization": f"Bearer {API_KEY}"}
        assert client.is_model_ready("digits", headers=right)
        assert infer(client, "digits", images[:1], headers=right).shape == (1, 10)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (BadRequest("input 'x' has NaN; the model forbids it"), "INVALID_ARGUMENT"),
        (Unauthorized("no"), "UNAUTHENTICATED"),
        (ModelNotFound("gone"), "NOT_FOUND"),
        (PayloadTooLarge("too big"), "RESOURCE_EXHAUSTED"),
        (Overloaded("queue full (4 waiting); retry later", retry_after_s=0.2), "UNAVAILABLE"),
        (NotReady("loading"), "UNAVAILABLE"),
        (ServeError("engine failed"), "INTERNAL"),
    ],
)
def test_serve_errors_map_to_grpc_codes_with_their_message(error, code):
    server, url = serve({"refusing": RefusingModel(error)})
    try:
        with grpc.insecure_channel(url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = raw_request("refusing", "FP32", [1], bytes(4))
            request.inputs[0].name = "x"

            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request)

            assert caught.value.code() == getattr(grpc.StatusCode, code)
            assert caught.value.details() == str(error)
            trailers = dict(caught.value.trailing_metadata() or ())
            assert trailers.get("retry-after") == ("1" if isinstance(error, Overloaded) else None)
    finally:
        server.stop(None)


def test_an_unexpected_failure_is_internal_without_a_traceback(caplog):
    server, url = serve({"refusing": RefusingModel(RuntimeError("segfault-ish detail"))})
    try:
        with grpc.insecure_channel(url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = raw_request("refusing", "FP32", [1], bytes(4))
            request.inputs[0].name = "x"

            code, details = grpc_refused(stub.ModelInfer, request)

            assert code == grpc.StatusCode.INTERNAL
            assert details == "ModelInfer failed inside the server; its log has the details"
            assert "segfault-ish detail" in caplog.text  # logged with its traceback
            assert stub.ServerLive(pb.ServerLiveRequest()).live
    finally:
        server.stop(None)


def test_a_model_not_ready_makes_the_server_not_ready():
    server, url = serve({"refusing": RefusingModel(RuntimeError(), ready=False)})
    client = grpcclient.InferenceServerClient(url=url)
    try:
        assert client.is_server_live()
        assert not client.is_server_ready()
        assert not client.is_model_ready("refusing")
        tensor = grpcclient.InferInput("x", [1], "FP32")
        tensor.set_data_from_numpy(np.zeros(1, np.float32))
        status, message = refused(client.infer, "refusing", [tensor])
        assert status == "StatusCode.UNAVAILABLE"
        assert message.startswith("model 'refusing' is still loading or self-testing")
    finally:
        client.close()
        server.stop(None)


def test_a_port_in_use_is_an_error_that_says_what_to_do(digits):
    server, url = serve(digits)
    try:
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(EdgeRuntimeError) as caught:
            start_grpc_server(digits, "127.0.0.1", port)
        assert str(caught.value) == (
            f"cannot serve gRPC on 127.0.0.1:{port}: the port is in use or the address is "
            "not this machine's; choose another --grpc-port or --host"
        )
    finally:
        server.stop(None)


def self_signed(directory: Path) -> tuple[bytes, bytes, Path]:
    """A certificate for localhost and 127.0.0.1, its key, and the certificate's path."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = directory / "server.crt"
    path.write_bytes(certificate_pem)
    return certificate_pem, key_pem, path


def test_tls(digits, images, tmp_path):
    certificate, key, certificate_path = self_signed(tmp_path)
    server, url = serve(digits, tls=(certificate, key), api_key=API_KEY)
    port = url.rsplit(":", 1)[1]
    client = grpcclient.InferenceServerClient(
        url=f"localhost:{port}", ssl=True, root_certificates=str(certificate_path)
    )
    plain = grpcclient.InferenceServerClient(url=url)
    try:
        headers = {"authorization": f"Bearer {API_KEY}"}
        served = infer(client, "digits", images[:1], headers=headers)
        expected = digits["digits"].runtime.run({"image": images[:1]})["logits"]
        np.testing.assert_array_equal(served, expected)
        assert refused(plain.is_server_live)[0] == "StatusCode.UNAVAILABLE"
    finally:
        client.close()
        plain.close()
        server.stop(None)


def test_an_unusable_tls_pair_is_refused_with_what_is_wrong(digits, tmp_path):
    certificate, key, _ = self_signed(tmp_path)
    _, other_key, _ = self_signed(tmp_path)
    from cryptography.hazmat.primitives import serialization

    encrypted = serialization.load_pem_private_key(key, None).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    cases = [
        ((b"not a pem", key), "the TLS certificate is not a PEM certificate"),
        ((certificate, encrypted), "the TLS key is not an unencrypted PEM private key"),
        ((certificate, other_key), "the TLS key does not belong to the certificate"),
    ]
    for tls, message in cases:
        with pytest.raises(EdgeRuntimeError) as caught:
            start_grpc_server(digits, "127.0.0.1", free_port(), tls=tls)
        assert str(caught.value).startswith(message)
