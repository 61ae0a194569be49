"""The HTTP app of ``edge-runtime serve``: the OIP v2 routes, ``/metrics``, and whatever
other front ends add (``extra_routes``), behind one guard.

The guard (a plain ASGI middleware, outermost) checks the API key, refuses a body larger
than ``max_body_bytes`` (by its Content-Length before reading anything, else as it
arrives), gives a client ``read_timeout_s`` to send its body, and counts every answer in
the metrics. Every ``ServeError`` becomes a JSON error with its status: OIP's
``{"error": "..."}`` under ``/v2``, and OpenAI's error object under ``/v1``.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import oip_rest
from .metrics import CONTENT_TYPE, ServeMetrics
from .protocol import (
    LanguageModel,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServeError,
    TensorModel,
    Unauthorized,
)
from .settings import ServeSettings

log = logging.getLogger(__name__)

# Open without the API key: a supervisor or load balancer probes them.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
ROUTE_NAMES = {
    "infer": "infer",
    "model_metadata": "metadata",
    "model_ready": "ready",
    "live": "health",
    "ready": "health",
    "server_metadata": "metadata",
    "metrics": "metrics",
}


@dataclass
class ServeState:
    """What the routes of every front end reach as ``request.app.state.serve``."""

    settings: ServeSettings
    tensor_models: Mapping[str, TensorModel]
    language_models: Mapping[str, LanguageModel] = field(default_factory=dict)
    metrics: ServeMetrics | None = None
    draining: bool = False  # set on SIGTERM: ready answers 503 while requests finish
    api_key: str | None = None

    def ready(self) -> bool:
        """Every model loaded and self-tested, and not shutting down."""
        models = [*self.tensor_models.values(), *self.language_models.values()]
        return not self.draining and all(model.ready for model in models)


def error_body(exc: ServeError, path: str) -> dict[str, Any]:
    """The JSON of an error: OpenAI's error object under /v1, OIP's elsewhere."""
    if path.startswith("/v1/") or path == "/v1":
        return {"error": {"message": str(exc), "type": exc.kind, "param": None, "code": None}}
    return {"error": str(exc), "code": exc.kind}


def error_response(exc: ServeError, path: str) -> JSONResponse:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc, path), status_code=exc.status, headers=headers)


async def _serve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServeError)
    if isinstance(exc, Overloaded):
        request.scope["edgepack.rejected"] = True
    return error_response(exc, request.url.path)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = ServeError(
        f"no route {request.method} {request.url.path}; the Open Inference Protocol is "
        "under /v2 (see docs/serve.md)"
        if exc.status_code == 404
        else f"{exc.detail}: {request.method} {request.url.path}"
    )
    error.status = exc.status_code
    error.kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(error, request.url.path)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(ServeError(f"internal error: {type(exc).__name__}"), request.url.path)


async def metrics(request: Request) -> Response:
    registry = request.app.state.serve.metrics
    return Response(registry.render() if registry else b"", media_type=CONTENT_TYPE)


class Guard:
    """API key, body size and read timeout, metrics: around every HTTP request."""

    def __init__(self, app, state: ServeState) -> None:
        self.app = app
        self.state = state
        settings = state.settings
        self.max_body = settings.max_body_bytes
        self.read_timeout_s = settings.read_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [0]

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await error_response(refusal, scope["path"])(scope, receive, counted_send)
                return
            await self.app(scope, self._limited(receive), counted_send)
        finally:
            self._count(scope, status[0], time.perf_counter() - started)

    def _refusal(self, scope) -> ServeError | None:
        headers = dict(scope["headers"])
        key = self.state.api_key
        if key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), key.encode()):
                return Unauthorized(
                    "missing or wrong API key: send 'Authorization: Bearer KEY' with the key "
                    "from the server's --api-key-file"
                )
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return PayloadTooLarge(
                f"the body is {length.decode(errors='replace')} bytes; this server takes at "
                f"most {self.max_body} (--max-body-bytes)"
            )
        return None

    def _limited(self, receive):
        """``receive`` that refuses a body beyond the limit or later than the timeout."""
        received = 0
        deadline: float | None = None
        done = False
        limit, timeout = self.max_body, self.read_timeout_s

        async def limited():
            nonlocal received, deadline, done
            if done:  # the body is in: later calls wait for a disconnect, untimed
                return await receive()
            if deadline is None:
                deadline = time.monotonic() + timeout
            try:
                with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"the body did not arrive within {timeout:g} s (--read-timeout-s)"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(
                        f"the body is more than {limit} bytes, this server's limit "
                        "(--max-body-bytes)"
                    )
                done = not message.get("more_body", False)
            return message

        return limited

    def _count(self, scope, status: int, seconds: float) -> None:
        registry = self.state.metrics
        if registry is None:
            return
        endpoint = scope.get("endpoint")
        route = ROUTE_NAMES.get(getattr(endpoint, "__name__", ""), "other")
        if scope["path"].startswith("/v1/"):
            route = "openai"
        model = (scope.get("path_params") or {}).get("name")
        rejected = bool(scope.get("edgepack.rejected"))
        registry.answered(model, route, status or 500, seconds, rejected)


def build_app(
    settings: ServeSettings,
    tensor_models: Mapping[str, TensorModel],
    extra_routes: Sequence[BaseRoute] = (),
    *,
    language_models: Mapping[str, LanguageModel] | None = None,
    metrics_registry: ServeMetrics | None = None,
    api_key: str | None = None,
) -> Starlette:
    """The Starlette app: OIP v2 REST, ``/metrics`` and ``extra_routes`` (e.g. the OpenAI
    routes), behind the guard. Routes reach the models as ``request.app.state.serve``
    (a ``ServeState``); a ``ServeError`` raised in any route becomes its JSON error."""
    language_models = dict(language_models or {})
    names = [*tensor_models, *language_models]
    state = ServeState(
        settings=settings,
        tensor_models=tensor_models,
        language_models=language_models,
        metrics=metrics_registry or ServeMetrics(names),
        api_key=api_key,
    )
    app = Starlette(
        routes=[
            *oip_rest.routes(),
            Route("/metrics", metrics, methods=["GET"]),
            *extra_routes,
        ],
        exception_handlers={
            ServeError: _serve_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
    )
    app.state.serve = state
    app.add_middleware(Guard, state=state)
    return app
