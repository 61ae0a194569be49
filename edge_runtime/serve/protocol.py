"""What the protocol front ends of `edge-runtime serve` need from a served model.

The front ends (Open Inference Protocol v2 over REST and gRPC, the OpenAI API) are thin
translations; the model side (a verified bundle behind a bounded queue, with dynamic
batching for tensor models) implements these protocols. Keeping the seam here lets each
front end be tested against a real model host, and lets both be written side by side.

Errors carry the HTTP status a front end answers with; gRPC maps them to its own codes
(``GRPC_CODES``). Messages say what was wrong and how to fix it, and never hold a
traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class ServeError(Exception):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    status = 500
    kind = "internal_error"  # OpenAI's error "type"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BadRequest(ServeError):
    """Malformed or inconsistent input: bad JSON, datatype, shape, data length."""

    status = 400
    kind = "invalid_request_error"


class Unauthorized(ServeError):
    status = 401
    kind = "authentication_error"


class ModelNotFound(ServeError):
    status = 404
    kind = "not_found_error"


class PayloadTooLarge(ServeError):
    status = 413
    kind = "invalid_request_error"


class RequestTimeout(ServeError):
    """The client did not send its request in time (``--read-timeout-s``)."""

    status = 408
    kind = "timeout_error"


class Overloaded(ServeError):
    """The model's queue is full: answered at once with 503 and Retry-After."""

    status = 503
    kind = "overloaded_error"


class NotReady(ServeError):
    status = 503
    kind = "unavailable_error"


# gRPC status code names (grpc.StatusCode members) for each HTTP status above.
GRPC_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    413: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
    500: "INTERNAL",
}


@dataclass(frozen=True)
class TensorMetadata:
    """One input or output as the Open Inference Protocol describes it."""

    name: str
    datatype: str  # "FP32", "INT64", "BOOL", "BYTES", ... (OIP v2 names)
    shape: list[int]  # -1 for a free dimension


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    platform: str  # e.g. "onnxruntime_onnx", "tflite", "llama.cpp"
    versions: list[str] = field(default_factory=lambda: ["1"])
    inputs: list[TensorMetadata] = field(default_factory=list)
    outputs: list[TensorMetadata] = field(default_factory=list)


@runtime_checkable
class TensorModel(Protocol):
    """A tensor model (ONNX, TFLite bundle) behind a bounded queue."""

    name: str

    @property
    def ready(self) -> bool:
        """Loaded and self-tested."""

    def metadata(self) -> ModelMetadata: ...

    def infer(self, inputs: dict[str, Any], outputs: list[str] | None = None) -> dict[str, Any]:
        """Run one request: numpy arrays by input name in, by output name out (all outputs
        when ``outputs`` is None). Blocking; thread-safe; may batch with concurrent
        requests. Raises ``ServeError`` subclasses (``Overloaded`` at once when the queue
        is full, ``BadRequest`` for inputs the model refuses)."""


@runtime_checkable
class EmbeddingModel(Protocol):
    """A bundle that carries a tokenizer and returns embeddings for text."""

    name: str

    def embed(self, texts: list[str]) -> tuple[Any, int]:
        """Normalised embeddings [len(texts), dim] (numpy float32) and the tokens used."""


@runtime_checkable
class LanguageModel(Protocol):
    """A GGUF bundle: one request at a time (llama.cpp's context), queued within a bound."""

    name: str
    context_length: int

    def complete(self, request: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """llama-cpp-python's create_completion / create_chat_completion arguments in,
        its OpenAI-shaped result (or chunks, with ``stream``) out."""
