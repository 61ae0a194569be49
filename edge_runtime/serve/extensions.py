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
