"""The Open Inference Protocol v2 over gRPC: ``inference.GRPCInferenceService``.

A thin translation between the protocol's messages and ``TensorModel``: tensors arrive as
``raw_input_contents`` (what tritonclient.grpc sends) or typed ``contents``, and leave as
``raw_output_contents``. Every refusal is a gRPC status whose code comes from the
``ServeError``'s HTTP status (``protocol.GRPC_CODES``) and whose message says what was
wrong; a bad request never stops the server.

Imported only by ``edge-runtime serve``: it needs grpcio and protobuf (the serve extra).
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Callable, Mapping
from concurrent import futures
from typing import Any, TypeVar

import grpc
import numpy as np

from .. import __version__
from ..errors import EdgeRuntimeError
from .proto import grpc_predict_v2_pb2 as pb
from .proto import grpc_predict_v2_pb2_grpc as pb_grpc
from .protocol import (
    GRPC_CODES,
    BadRequest,
    ModelNotFound,
    NotReady,
    ServeError,
    TensorModel,
    Unauthorized,
)
from .tensors import NUMPY_OF_DATATYPE

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20
SERVER_NAME = "edge-runtime"

# The protocol's datatypes that numpy holds as they are (one table for REST and gRPC).
DATATYPES = NUMPY_OF_DATATYPE
KNOWN_DATATYPES = ", ".join([*DATATYPES, "BYTES"])
# Which field of InferTensorContents holds each datatype (FP16 travels only raw).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# Readiness probes answer without the API key, as the REST health routes do.
OPEN_CALLS = frozenset({"ServerLive", "ServerReady"})


def start_grpc_server(
    models: Mapping[str, TensorModel],
    host: str,
    port: int,
    api_key: str | None = None,
    tls: tuple[bytes, bytes] | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    *,
    workers: int = 16,
    max_concurrent_rpcs: int | None = 64,
) -> grpc.Server:
    """Serve ``models`` over gRPC on ``host:port`` and return the started server.

    Args:
        models: the tensor models by the name clients use.
        host: address to bind (an IPv6 address without brackets is accepted).
        port: TCP port to bind.
        api_key: when set, every call but ServerLive and ServerReady needs the metadata
            ``authorization: Bearer <api_key>``; others get UNAUTHENTICATED.
        tls: (certificate chain PEM, private key PEM) to serve TLS; None serves plain
            HTTP/2.
        max_message_bytes: largest request and response message; a larger one gets
            RESOURCE_EXHAUSTED from grpc before it is decoded.
        workers: threads running calls; an inference holds one while its model works.
        max_concurrent_rpcs: calls in progress or waiting for a worker; more get
            RESOURCE_EXHAUSTED at once rather than queueing without bound. None: no bound.

    Returns:
        The started ``grpc.Server``. ``server.stop(grace_s)`` stops accepting calls and
        lets those in flight finish within ``grace_s``; wait on the event it returns.

    Raises:
        EdgeRuntimeError: the address cannot be bound (in use, not local), or the TLS
            certificate or key is not PEM, or the key is not the certificate's.
    """
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be positive, not {max_message_bytes}")
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # grpc sets SO_REUSEPORT by default: a second server on a port in use would bind
        # and share it silently instead of failing.
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc-v2"),
        options=options,
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(models, api_key), server)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            certificate_chain, private_key = tls
            check_tls_pair(certificate_chain, private_key)
            credentials = grpc.ssl_server_credentials([(private_key, certificate_chain)])
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpc >= 1.50 raises where older versions returned 0
        bound = 0
    if bound == 0:
        raise EdgeRuntimeError(
            f"cannot serve gRPC on {address}: the port is in use or the address is not "
            "this machine's; choose another --grpc-port or --host"
        )
    server.start()
    log.info("gRPC (Open Inference Protocol v2) on %s%s", address, " with TLS" if tls else "")
    return server


def check_tls_pair(certificate_chain: bytes, private_key: bytes) -> None:
    """Raise EdgeRuntimeError unless the PEM key belongs to the PEM chain's first
    certificate: grpc would only log that it cannot, and fail to bind."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        leaf = x509.load_pem_x509_certificates(certificate_chain)[0]
    except ValueError:
        raise EdgeRuntimeError(
            "the TLS certificate is not a PEM certificate (-----BEGIN CERTIFICATE-----)"
        ) from None
    try:
        key = serialization.load_pem_private_key(private_key, password=None)
    except (ValueError, TypeError):
        raise EdgeRuntimeError(
            "the TLS key is not an unencrypted PEM private key (-----BEGIN PRIVATE KEY-----); "
            "decrypt it with `openssl pkey -in KEY -out KEY.pem`"
        ) from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise EdgeRuntimeError(
            "the TLS key does not belong to the certificate: give the key the certificate "
            "was issued for"
        )


Handler = TypeVar("Handler", bound=Callable[..., Any])


def _answers(call: Handler) -> Handler:
    """Turn what a call raises into a gRPC status: a ServeError's code and message, or
    INTERNAL (logged with its traceback) for anything unexpected."""
    name = call.__name__

    def answer(self: InferenceServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            if name not in OPEN_CALLS:
                self.authorize(context)
            return call(self, request, context)
        except ServeError as exc:
            error: ServeError = exc
        except Exception:
            log.exception("gRPC %s failed", name)
            error = ServeError(f"{name} failed inside the server; its log has the details")
        if error.retry_after_s is not None:
            retry_after = str(max(1, math.ceil(error.retry_after_s)))
            context.set_trailing_metadata((("retry-after", retry_after),))
        code = getattr(grpc.StatusCode, GRPC_CODES.get(error.status, "INTERNAL"))
        context.abort(code, str(error))

    answer.__name__ = name
    answer.__doc__ = call.__doc__
    return answer  # type: ignore[return-value]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The six calls of the protocol that edge-runtime answers; others are UNIMPLEMENTED."""

    def __init__(self, models: Mapping[str, TensorModel], api_key: str | None) -> None:
        self.models = dict(models)
        self._expected = f"Bearer {api_key}".encode() if api_key else None

    def authorize(self, context: grpc.ServicerContext) -> None:
        if self._expected is None:
            return
        sent = dict(context.invocation_metadata()).get("authorization")
        how = "send the metadata 'authorization: Bearer <key>' with the server's API key"
        if sent is None:
            raise Unauthorized(f"this server needs an API key: {how}")
        sent_bytes = sent.encode() if isinstance(sent, str) else sent
        if not hmac.compare_digest(sent_bytes, self._expected):
            raise Unauthorized(f"wrong API key: {how}")

    def model(self, name: str, version: str = "") -> TensorModel:
        model = self.models.get(name)
        if model is None:
            served = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(f"unknown model {name!r}; this server serves: {served}")
        if version:
            versions = model.metadata().versions
            if version not in versions:
                raise ModelNotFound(
                    f"model {name!r} has no version {version!r}; its versions: "
                    f"{', '.join(versions)} (or leave the version empty)"
                )
        return model

    @_answers
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @_answers
    def ServerReady(self, request, context):
        ready = bool(self.models) and all(model.ready for model in self.models.values())
        return pb.ServerReadyResponse(ready=ready)

    @_answers
    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.model(request.name, request.version).ready)

    @_answers
    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    @_answers
    def ModelMetadata(self, request, context):
        meta = self.model(request.name, request.version).metadata()
        tensor = pb.ModelMetadataResponse.TensorMetadata

        def described(tensors) -> list:
            return [tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in tensors]

        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=meta.platform,
            inputs=described(meta.inputs),
            outputs=described(meta.outputs),
        )

    @_answers
    def ModelInfer(self, request, context):
        model = self.model(request.model_name, request.model_version)
        if not model.ready:
            raise NotReady(
                f"model {request.model_name!r} is still loading or self-testing; retry when "
                "ModelReady says it is ready"
            )
        meta = model.metadata()
        inputs = decode_inputs(request, {t.name: t.datatype for t in meta.inputs})
        known_outputs = [t.name for t in meta.outputs]
        wanted = [output.name for output in request.outputs] or None
        for name in wanted or ():
            if name not in known_outputs:
                raise BadRequest(
                    f"model {meta.name!r} has no output {name!r}; its outputs: "
                    f"{', '.join(known_outputs)}"
                )
        results = model.infer(inputs, wanted)
        response = pb.ModelInferResponse(
            model_name=meta.name,
            model_version=request.model_version or meta.versions[-1],
            id=request.id,
        )
        for name in wanted or list(results):
            datatype, raw = encode_output(name, results[name])
            response.outputs.add(name=name, datatype=datatype, shape=np.shape(results[name]))
            response.raw_output_contents.append(raw)
        return response


def decode_inputs(request: Any, datatypes: Mapping[str, str]) -> dict[str, np.ndarray]:
    """The request's tensors as numpy arrays by name, checked against the model's input
    names and datatypes (``datatypes``); raises ``BadRequest`` naming what is wrong.
    Raw tensors are read-only views of the request's bytes, not copies."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: "
            "send one per input, in the order of inputs"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name, datatype = tensor.name, tensor.datatype
        if name in arrays:
            raise BadRequest(f"input {name!r} is given twice")
        expected = datatypes.get(name)
        if expected is None:
            raise BadRequest(f"the model has no input {name!r}; its inputs: {', '.join(datatypes)}")
        if datatype not in DATATYPES and datatype != "BYTES":
            raise BadRequest(
                f"input {name!r}: unknown datatype {datatype!r}; the protocol's datatypes "
                f"are {KNOWN_DATATYPES}"
            )
        if datatype != expected:
            raise BadRequest(f"input {name!r} is {expected}, not {datatype}")
        shape = list(tensor.shape)
        if any(size < 0 for size in shape):
            raise BadRequest(f"input {name!r}: shape {shape} has a negative size")
        if raw:
            if tensor.HasField("contents"):
                raise BadRequest(
                    f"input {name!r} has both contents and raw_input_contents; send one"
                )
            arrays[name] = _from_raw(name, datatype, shape, raw[index])
        else:
            arrays[name] = _from_contents(name, datatype, shape, tensor.contents)
    return arrays


def _length_error(name: str, datatype: str, shape: list[int], got: str, count: int) -> BadRequest:
    return BadRequest(
        f"input {name!r}: shape {shape} holds {count} {datatype} elements, but {got}; "
        "the data must be the whole tensor, flattened in row-major order"
    )


def _from_raw(name: str, datatype: str, shape: list[int], data: bytes) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_array(name, shape, _split_bytes(name, data), count)
    dtype = DATATYPES[datatype]
    if len(data) != count * dtype.itemsize:
        raise _length_error(
            name, datatype, shape, f"{len(data)} bytes came ({dtype.itemsize} per element)", count
        )
    # No copy: the array reads the request's buffer (numpy marks it read-only).
    return (
        np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)
    )


def _from_contents(name: str, datatype: str, shape: list[int], contents: Any) -> np.ndarray:
    count = math.prod(shape)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:  # FP16: no typed field holds it
        raise BadRequest(f"input {name!r}: {datatype} data travels only in raw_input_contents")
    values = getattr(contents, field)
    if len(values) != count:
        raise _length_error(name, datatype, shape, f"{field} has {len(values)}", count)
    if datatype == "BYTES":
        return _bytes_array(name, shape, list(values), count)
    dtype = DATATYPES[datatype].newbyteorder("=")
    if dtype.kind in "iu" and values:
        wide = np.asarray(values, dtype=np.int64 if dtype.kind == "i" else np.uint64)
        limits = np.iinfo(dtype)
        if wide.min() < limits.min or wide.max() > limits.max:
            raise BadRequest(
                f"input {name!r}: a value lies outside {datatype}'s range "
                f"[{limits.min}, {limits.max}]"
            )
        return wide.astype(dtype).reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def _split_bytes(name: str, data: bytes) -> list[bytes]:
    """BYTES elements on the wire: each a 4-byte little-endian length, then its bytes."""
    items, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise BadRequest(f"input {name!r}: BYTES data ends inside an element's length")
        size = int.from_bytes(data[offset : offset + 4], "little")
        offset += 4
        if offset + size > len(data):
            raise BadRequest(
                f"input {name!r}: a BYTES element claims {size} bytes, past the data's end"
            )
        items.append(data[offset : offset + size])
        offset += size
    return items


def _bytes_array(name: str, shape: list[int], items: list[bytes], count: int) -> np.ndarray:
    if len(items) != count:
        raise _length_error(name, "BYTES", shape, f"{len(items)} came", count)
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


def encode_output(name: str, value: Any) -> tuple[str, bytes]:
    """An output array's protocol datatype and raw bytes (little-endian, row-major)."""
    array = np.asarray(value)
    if array.dtype.kind in "OSU":
        pieces = []
        for item in array.reshape(-1):
            data = item.encode() if isinstance(item, str) else bytes(item)
            pieces += [len(data).to_bytes(4, "little"), data]
        return "BYTES", b"".join(pieces)
    little = array.dtype.newbyteorder("<")
    for datatype, dtype in DATATYPES.items():
        if little == dtype:
            return datatype, np.ascontiguousarray(array, dtype=dtype).tobytes()
    raise ServeError(f"output {name!r} has dtype {array.dtype}, which the protocol cannot carry")
