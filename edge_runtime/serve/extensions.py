"""The front ends and helpers that run beside the HTTP server of `edge-runtime serve`:
the Open Inference Protocol's gRPC service, and systemd's readiness and watchdog."""

from __future__ import annotations

import logging
import time

from .server import ServeExtension
from .settings import ServeSettings

log = logging.getLogger(__name__)

# The serving loop ticks about once a second; this long without a tick means it is stuck
# (and systemd's watchdog, fed no more, restarts the service).
STUCK_AFTER_S = 10.0


class GrpcFrontEnd(ServeExtension):
    """``inference.GRPCInferenceService`` on ``--grpc-port``, over the same model hosts
    (queues, batching) and with the same API key and TLS files as the REST routes."""

    def __init__(self, settings: ServeSettings, api_key: str | None) -> None:
        self.settings = settings
        self.api_key = api_key
        self.server = None

    def start(self, state) -> None:
        from .grpc_v2 import start_grpc_server

        settings = self.settings
        tls = None
        if settings.tls_certfile is not None and settings.tls_keyfile is not None:
            tls = (settings.tls_certfile.read_bytes(), settings.tls_keyfile.read_bytes())
        self.server = start_grpc_server(
            state.tensor_models,
            settings.host,
            settings.grpc_port,
            api_key=self.api_key,
            tls=tls,
            max_message_bytes=settings.max_body_bytes,
        )
        log.info("gRPC listening on %s:%s", settings.host, settings.grpc_port)

    def stop(self, grace_s: float) -> None:
        if self.server is not None:
            self.server.stop(grace_s).wait(grace_s + 1)


class SystemdNotifier(ServeExtension):
    """READY=1 once every model is loaded and self-tested, then WATCHDOG=1 at half of
    systemd's WatchdogSec while the serving loop keeps ticking; STOPPING=1 on shutdown.
    Outside systemd (no NOTIFY_SOCKET) it does nothing."""

    def __init__(self) -> None:
        self.last_tick = time.monotonic()
        self.watchdog = None

    def healthy(self) -> bool:
        return time.monotonic() - self.last_tick < STUCK_AFTER_S

    def tick(self, state) -> None:
        self.last_tick = time.monotonic()

    def ready(self, state) -> None:
        from .systemd import Watchdog, notify_ready

        self.last_tick = time.monotonic()
        notify_ready(f"serving {', '.join([*state.tensor_models, *state.language_models])}")
        self.watchdog = Watchdog(self.healthy)
        self.watchdog.start()

    def stop(self, grace_s: float) -> None:
        from .systemd import notify_stopping

        notify_stopping()
        if self.watchdog is not None:
            self.watchdog.stop()


class QueuedEmbeddings:
    """``protocol.EmbeddingModel`` over a served tensor model whose bundle carries a
    tokenizer: each request runs on the model's worker, in turn with the OIP requests and
    within the same queue bound."""

    def __init__(self, host) -> None:
        self.host = host
        self.name = host.name

    def embed(self, texts: list[str]):
        def work(runtime):
            batch = runtime.tokenize(texts)
            return runtime.embed(batch), batch.tokens

        return self.host.call(work).result()


class OpenAiFrontEnd(ServeExtension):
    """The OpenAI API: /v1/models, /v1/chat/completions and /v1/completions for
    language-model (GGUF) bundles, /v1/embeddings for bundles built with --tokenizer
    for the embedding task."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        # Filled in start(), once the hosts exist; the routes read them per request.
        self.embedding_models: dict = {}
        self.language_models: dict = {}

    def routes(self):
        from .openai_api import openai_routes

        return openai_routes(
            self.embedding_models,
            self.language_models,
            max_body_bytes=self.settings.max_body_bytes,
        )

    def start(self, state) -> None:
        self.language_models.update(state.language_models)
        for name, host in state.tensor_models.items():
            text = host.ref.manifest.text
            if text is not None and text.task == "embedding":
                self.embedding_models[name] = QueuedEmbeddings(host)
