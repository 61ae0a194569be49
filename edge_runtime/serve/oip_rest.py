"""Open Inference Protocol v2 over REST (KServe v2, Triton's HTTP API), with the binary
tensor data extension that ``tritonclient.http`` uses by default.

A request body is a JSON object, optionally followed by the raw bytes of the inputs that
carry ``parameters.binary_data_size``, in input order; the ``Inference-Header-Content-Length``
header gives the JSON's length. An output is answered in binary when its own
``parameters.binary_data`` says so, or else when the request's ``binary_data_output``
does; the answer then carries the same header and the bytes of those outputs, in order.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from .protocol import BadRequest, ModelMetadata, ModelNotFound, NotReady, TensorModel
from .tensors import (
    array_from_bytes,
    array_from_json,
    check_datatype,
    check_shape,
    output_bytes,
    output_json,
)

HEADER_LENGTH = "inference-header-content-length"
SERVER_NAME = "edge-runtime"
EXTENSIONS = ["binary_tensor_data"]


@dataclass
class InferRequest:
    """A parsed infer request: arrays by input name, and how to answer."""

    inputs: dict[str, np.ndarray]
    outputs: list[str] | None  # None: every output
    binary: dict[str, bool]  # output name -> answered in binary
    binary_default: bool
    request_id: str | None


def parse_infer(meta: ModelMetadata, body: bytes, header_length: str | None) -> InferRequest:
    """Parse an infer request body against the model's metadata.

    Raises:
        BadRequest: naming the first problem (JSON, UTF-8, an input's name, datatype,
            shape, or data length, the binary section's lengths).
    """
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 <= length <= len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length {header_length!r} is not within the "
                f"body's {len(body)} bytes"
            )
        text, binary = body[:length], memoryview(body)[length:]
    else:
        text, binary = body, memoryview(b"")
    request = _json_object(text)
    inputs_json = request.get("inputs")
    if not isinstance(inputs_json, list) or not inputs_json:
        raise BadRequest('the request needs "inputs": a list of tensors')
    by_name = {tensor.name: tensor for tensor in meta.inputs}
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for item in inputs_json:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest('each input must be an object with a "name"')
        name = item["name"]
        tensor = by_name.get(name)
        if tensor is None:
            raise BadRequest(
                f"model {meta.name!r} has no input {name!r}; its inputs are {', '.join(by_name)}"
            )
        if name in inputs:
            raise BadRequest(f"input {name!r} is given twice")
        dtype = check_datatype(tensor, item.get("datatype"))
        shape = check_shape(tensor, item.get("shape"))
        size = _parameters(item).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"input {name!r}: binary_data_size must be a size in bytes")
            if offset + size > len(binary):
                raise BadRequest(
                    f"input {name!r}: binary_data_size {size} goes beyond the body: "
                    f"{len(binary) - offset} bytes of binary data are left"
                )
            inputs[name] = array_from_bytes(tensor, dtype, shape, binary[offset : offset + size])
            offset += size
        elif "data" in item:
            inputs[name] = array_from_json(tensor, dtype, shape, item["data"])
        else:
            raise BadRequest(f'input {name!r} has neither "data" nor a binary_data_size')
    if offset != len(binary):
        raise BadRequest(
            f"{len(binary) - offset} bytes of binary data follow the inputs that no "
            "binary_data_size accounts for"
        )
    outputs, binary_of = _requested_outputs(meta, request.get("outputs"))
    default = _parameters(request).get("binary_data_output", False)
    if not isinstance(default, bool):
        raise BadRequest("parameters.binary_data_output must be true or false")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest('"id" must be a string')
    return InferRequest(inputs, outputs, binary_of, default, request_id)


def _json_object(text: bytes | memoryview) -> dict[str, Any]:
    try:
        decoded = bytes(text).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(
            f"the request's JSON is not valid UTF-8 (byte {exc.start}); send UTF-8 text, and "
            "raw bytes only after Inference-Header-Content-Length"
        ) from None
    try:
        request = json.loads(decoded, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the request is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the request's JSON is nested too deeply") from None
    if not isinstance(request, dict):
        raise BadRequest("the request must be a JSON object")
    return request


def _no_constant(name: str) -> Any:
    raise BadRequest(f"the request is not valid JSON: {name} is not a JSON value")


def _parameters(item: dict[str, Any]) -> dict[str, Any]:
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest('"parameters" must be an object')
    return parameters


def _requested_outputs(
    meta: ModelMetadata, requested: Any
) -> tuple[list[str] | None, dict[str, bool]]:
    if requested is None:
        return None, {}
    if not isinstance(requested, list):
        raise BadRequest('"outputs" must be a list of {"name": ...} objects')
    known = [tensor.name for tensor in meta.outputs]
    names: list[str] = []
    binary: dict[str, bool] = {}
    for item in requested:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in known:
            raise BadRequest(
                f"model {meta.name!r} has no output {name!r}; its outputs are {', '.join(known)}"
            )
        names.append(name)
        flag = _parameters(item).get("binary_data")
        if flag is not None:
            if not isinstance(flag, bool):
                raise BadRequest(f"output {name!r}: binary_data must be true or false")
            binary[name] = flag
    return names, binary


def infer_response(
    meta: ModelMetadata, parsed: InferRequest, outputs: dict[str, np.ndarray]
) -> Response:
    """The answer: JSON, or JSON then the binary outputs with the header length."""
    from .tensors import datatype_of

    names = parsed.outputs if parsed.outputs is not None else list(outputs)
    tensors, chunks = [], []
    for name in names:
        array = outputs[name]
        tensor: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array.dtype.name),
            "shape": list(array.shape),
        }
        if parsed.binary.get(name, parsed.binary_default):
            raw = output_bytes(array)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = output_json(array)
        tensors.append(tensor)
    body: dict[str, Any] = {"model_name": meta.name, "model_version": meta.versions[0]}
    if parsed.request_id is not None:
        body["id"] = parsed.request_id
    body["outputs"] = tensors
    header = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *chunks]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


def metadata_json(meta: ModelMetadata) -> dict[str, Any]:
    def tensors(items) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": meta.platform,
        "inputs": tensors(meta.inputs),
        "outputs": tensors(meta.outputs),
    }


# -- routes -------------------------------------------------------------------------
def _model(request: Request) -> TensorModel:
    """The tensor model of the path (and its version, if the path names one)."""
    state = request.app.state.serve
    name = request.path_params["name"]
    model = state.tensor_models.get(name)
    if model is None:
        if name in state.language_models:
            raise ModelNotFound(
                f"model {name!r} is a language model: use the OpenAI API under /v1 "
                "(/v1/chat/completions, /v1/completions)"
            )
        known = ", ".join(state.tensor_models) or "none"
        raise ModelNotFound(f"no model {name!r} is served here; tensor models: {known}")
    version = request.path_params.get("version")
    versions = model.metadata().versions
    if version is not None and version not in versions:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; it has {versions}")
    return model


async def server_metadata(request: Request) -> Response:
    return JSONResponse({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})


async def live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def ready(request: Request) -> Response:
    is_ready = request.app.state.serve.ready()
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


async def model_metadata(request: Request) -> Response:
    return JSONResponse(metadata_json(_model(request).metadata()))


async def model_ready(request: Request) -> Response:
    model = _model(request)
    is_ready = model.ready and not request.app.state.serve.draining
    body = {"name": model.name, "ready": is_ready}
    return JSONResponse(body, status_code=200 if is_ready else 503)


async def infer(request: Request) -> Response:
    model = _model(request)
    if not model.ready:
        why = getattr(model, "problem", None) or "loading or stopping"
        raise NotReady(f"model {model.name!r} is not ready: {why}", retry_after_s=1.0)
    body = await request.body()
    meta = model.metadata()
    parsed = parse_infer(meta, body, request.headers.get(HEADER_LENGTH))
    del body  # the arrays are copies: let the body go while the request waits
    submit = getattr(model, "submit", None)
    if submit is not None:
        # Waits without holding a thread: a queued request costs a future, not a thread.
        outputs = await asyncio.wrap_future(submit(parsed.inputs, parsed.outputs))
    else:
        from starlette.concurrency import run_in_threadpool

        outputs = await run_in_threadpool(model.infer, parsed.inputs, parsed.outputs)
    return infer_response(meta, parsed, outputs)


def routes() -> list[Route]:
    """The OIP v2 REST routes (health, metadata, readiness, infer; with or without
    ``/versions/{version}``)."""
    found = []
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        found += [
            Route(prefix, model_metadata, methods=["GET"]),
            Route(prefix + "/ready", model_ready, methods=["GET"]),
            Route(prefix + "/infer", infer, methods=["POST"]),
        ]
    return [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        *found,
    ]
