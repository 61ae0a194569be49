"""The OpenAI API subset that llama.cpp's server and Ollama expose, as Starlette routes:
``GET /v1/models``, ``POST /v1/embeddings``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (see docs/serve-openai.md).

Every request is checked in full before any work starts, and before a stream's first
byte: a refusal is OpenAI's error object (``{"error": {"message", "type", "param",
"code"}}``) with a 4xx or 503 status, never a 200 carrying an error. The models behind
the routes are ``protocol.EmbeddingModel`` and ``protocol.LanguageModel`` hosts; their
blocking calls run in worker threads.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping
from typing import Any, Literal

import anyio
from anyio import to_thread
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .protocol import (
    BadRequest,
    EmbeddingModel,
    LanguageModel,
    ModelNotFound,
    PayloadTooLarge,
    ServeError,
)
from .text_models import bad_request

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own bound per request
MAX_STOP_STRINGS = 4
OWNER = "edgepack"


# --- requests ---------------------------------------------------------------------------


class _Request(BaseModel):
    # OpenAI refuses arguments it does not know; so does this server (it names them).
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    user: str | None = None


class EmbeddingsRequest(_Request):
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Generation(_Request):
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.8, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logprobs: Literal[False] | None = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return stop


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def plain(self) -> dict[str, str]:
        """As the chat template takes it: a role and its text (``developer`` is the newer
        name of ``system``; text parts are joined)."""
        content = self.content
        if not isinstance(content, str):
            content = "\n".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_Generation):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)  # newer clients' max_tokens


class CompletionRequest(_Generation):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: Literal[False] = False
    best_of: Literal[1] = 1
    suffix: None = None


# Arguments OpenAI knows that this server takes only at their default, and why.
ONLY_DEFAULT = {
    "n": "this server returns one choice; leave n out",
    "presence_penalty": "penalties are not supported; leave it out",
    "frequency_penalty": "penalties are not supported; leave it out",
    "logprobs": "log probabilities are not supported; leave it out",
    "echo": "echo is not supported; leave it out",
    "best_of": "best_of is not supported; leave it out",
    "suffix": "suffix is not supported; leave it out",
}


# --- errors -----------------------------------------------------------------------------


def openai_error(exc: ServeError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) of OpenAI's error object for ``exc``."""
    error = {
        "message": str(exc),
        "type": exc.kind,
        "param": getattr(exc, "param", None),
        "code": getattr(exc, "code", None),
    }
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    return exc.status, {"error": error}, headers


def openai_error_response(exc: ServeError) -> JSONResponse:
    """OpenAI's error object for ``exc`` as a Starlette response (for middleware that
    refuses a /v1 request before it reaches these routes: a key, a body limit)."""
    status, body, headers = openai_error(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_error(exc: ValidationError) -> BadRequest:
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param} (not supported here)"
    elif first["type"] == "missing":
        message = f"Missing required parameter: '{param}'"
    elif param in ONLY_DEFAULT:
        given = first.get("input")
        shown = json.dumps(given)[:80] if _jsonable(given) else type(given).__name__
        message = f"Invalid value for '{param}': {shown}: {ONLY_DEFAULT[param]}"
    else:
        given = first.get("input")
        shown = json.dumps(given)[:80] if _jsonable(given) else type(given).__name__
        message = (
            f"Invalid value for '{param}': {shown}: {first['msg'].removeprefix('Value error, ')}"
        )
    return bad_request(message, param)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# --- routes -----------------------------------------------------------------------------


def openai_routes(
    embedding_models: Mapping[str, EmbeddingModel],
    language_models: Mapping[str, LanguageModel],
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> list[Route]:
    """The OpenAI routes over these models, keyed by their names on the wire.

    Args:
        embedding_models: served on ``/v1/embeddings``.
        language_models: served on ``/v1/chat/completions`` and ``/v1/completions``.
        max_body_bytes: a larger request body is refused with 413.

    Returns:
        ``starlette.routing.Route`` objects to mount at the application's root.
    """
    api = _OpenAI(embedding_models, language_models, max_body_bytes)
    return [
        Route("/v1/models", api.endpoint(api.list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", api.endpoint(api.get_model), methods=["GET"]),
        Route("/v1/embeddings", api.endpoint(api.embeddings), methods=["POST"]),
        Route("/v1/chat/completions", api.endpoint(api.chat), methods=["POST"]),
        Route("/v1/completions", api.endpoint(api.completions), methods=["POST"]),
    ]


class _OpenAI:
    def __init__(
        self,
        embedding_models: Mapping[str, EmbeddingModel],
        language_models: Mapping[str, LanguageModel],
        max_body_bytes: int,
    ) -> None:
        self.embedding_models = embedding_models
        self.language_models = language_models
        self.max_body_bytes = max_body_bytes

    def endpoint(self, handler):
        """``handler`` with every refusal rendered as OpenAI's error object."""

        async def endpoint(request):
            try:
                return await handler(request)
            except ServeError as exc:
                return openai_error_response(exc)
            except Exception:
                log.exception("%s %s failed", request.method, request.url.path)
                body = {"message": "the server failed; see its log", "type": "server_error"}
                return JSONResponse({"error": {**body, "param": None, "code": None}}, 500)

        return endpoint

    # -- models

    def _names(self) -> list[str]:
        return [*self.embedding_models, *self.language_models]

    @staticmethod
    def _card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": OWNER}

    async def list_models(self, request):
        return JSONResponse({"object": "list", "data": [self._card(n) for n in self._names()]})

    async def get_model(self, request):
        name = request.path_params["model"]
        if name not in self._names():
            raise self._unknown(name)
        return JSONResponse(self._card(name))

    def _unknown(self, name: str) -> ModelNotFound:
        error = ModelNotFound(
            f"The model '{name}' does not exist; this server has: "
            f"{', '.join(self._names()) or 'none'} (GET /v1/models)"
        )
        error.param, error.code = "model", "model_not_found"
        return error

    def _model(self, name: str, models: Mapping[str, Any], route: str, other: str) -> Any:
        if name in models:
            return models[name]
        if name in self._names():
            raise bad_request(
                f"model '{name}' is {other}; {route} serves: {', '.join(models) or 'none'}",
                "model",
            )
        raise self._unknown(name)

    # -- the body

    async def _body(self, request, schema: type[BaseModel]) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large(int(declared))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large(size)
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise bad_request(
                f"the request body is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at "
                f"offset {exc.start}); send JSON encoded as UTF-8"
            ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise bad_request(
                f"the request body is not valid JSON ({exc.msg} at line {exc.lineno} column "
                f"{exc.colno}); send a JSON object"
            ) from None
        if not isinstance(data, dict):
            raise bad_request(f"the request body is a JSON {type(data).__name__}, not an object")
        try:
            # A lone surrogate ("\ud800") is valid JSON but no text: refuse it here.
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request(
                "the request holds a lone UTF-16 surrogate escape (e.g. \\ud800), which is "
                "not text; send valid Unicode"
            ) from None
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc) from None

    def _too_large(self, size: int) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body is {size} bytes or more; this server takes at most "
            f"{self.max_body_bytes}"
        )

    # -- embeddings

    async def embeddings(self, request):
        body = await self._body(request, EmbeddingsRequest)
        model = self._model(body.model, self.embedding_models, "/v1/embeddings", "a language model")
        texts = _embedding_texts(body.input)
        dimensions = getattr(model, "dimensions", None)
        if body.dimensions is not None and body.dimensions != dimensions:
            raise bad_request(
                f"dimensions is {body.dimensions}, but model '{body.model}' gives vectors of "
                f"{dimensions}; leave dimensions out",
                "dimensions",
            )
        vectors, tokens = await to_thread.run_sync(model.embed, texts)
        encode = _base64 if body.encoding_format == "base64" else _floats
        data = [
            {"object": "embedding", "index": index, "embedding": encode(vector)}
            for index, vector in enumerate(vectors)
        ]
        usage = {"prompt_tokens": int(tokens), "total_tokens": int(tokens)}
        return JSONResponse({"object": "list", "data": data, "model": body.model, "usage": usage})

    # -- completions

    async def chat(self, request):
        body = await self._body(request, ChatRequest)
        model = self._language_model(body)
        if not body.messages:
            raise bad_request("messages is empty; send at least one message", "messages")
        arguments = self._generation(body)
        arguments["messages"] = [message.plain() for message in body.messages]
        if body.max_completion_tokens is not None:
            arguments["max_tokens"] = body.max_completion_tokens
        return await self._complete(model, arguments, body.stream)

    async def completions(self, request):
        body = await self._body(request, CompletionRequest)
        model = self._language_model(body)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise bad_request(
                    f"prompt holds {len(prompt)} prompts; this server completes one per request",
                    "prompt",
                )
            prompt = prompt[0]
        arguments = self._generation(body)
        arguments["prompt"] = prompt
        return await self._complete(model, arguments, body.stream)

    def _language_model(self, body: _Generation) -> LanguageModel:
        route = "/v1/chat/completions" if isinstance(body, ChatRequest) else "/v1/completions"
        model = self._model(body.model, self.language_models, route, "an embedding model")
        if body.stream_options is not None and not body.stream:
            raise bad_request(
                "stream_options is only allowed when stream is true", "stream_options"
            )
        return model

    @staticmethod
    def _generation(body: _Generation) -> dict[str, Any]:
        arguments = body.model_dump(
            include={"max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
        )
        if body.stream_options is not None:
            arguments["stream_options"] = body.stream_options.model_dump()
        return arguments

    async def _complete(self, model: LanguageModel, arguments: dict[str, Any], stream: bool):
        # Admission, checks and the prompt's start happen here, before any byte is sent.
        result = await to_thread.run_sync(model.complete, arguments)
        if not stream:
            return JSONResponse(result)
        return EventStream(_events(result), media_type="text/event-stream", headers=SSE_HEADERS)


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_END = object()


class EventStream(StreamingResponse):
    """Closes its events once the response ends, sent or not: a client that went away
    frees the model at once, not when the generator is collected."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def _events(chunks):
    """Server-Sent Events of ``chunks``, ending with ``data: [DONE]``. A failure midway
    ends the connection without [DONE], so the client sees a broken stream."""
    try:
        while True:
            chunk = await to_thread.run_sync(next, chunks, _END)
            if chunk is _END:
                break
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            with anyio.CancelScope(shield=True):
                await to_thread.run_sync(close)


# --- embeddings -------------------------------------------------------------------------


def _embedding_texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise bad_request("input must be a string or a non-empty list of strings", "input")
    if all(isinstance(item, int) for item in value) or all(isinstance(i, list) for i in value):
        raise bad_request(
            "input as token arrays is not supported here; send the text (this server "
            "tokenizes it with the model's own tokenizer)",
            "input",
        )
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise bad_request(
            f"input holds {len(value)} texts; send at most {MAX_EMBEDDING_INPUTS} per request",
            "input",
        )
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise bad_request(
                f"input[{index}] is a {type(item).__name__}; every input must be a string",
                "input",
            )
    return value


def _floats(vector) -> list[float]:
    return [float(value) for value in vector]


def _base64(vector) -> str:
    """OpenAI's base64 encoding: the vector's little-endian float32 bytes."""
    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
