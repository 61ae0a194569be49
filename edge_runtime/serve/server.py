"""``run_serve``: verify the bundles, bind, load the models, serve until SIGTERM, drain.

Order of events:

1. Settings that cannot work are refused before anything binds: a non-loopback ``--host``
   without an API key (unless ``--insecure-no-auth``), a missing key or TLS file, a bundle
   that does not verify, two bundles under one name.
2. uvicorn binds and answers at once: ``/v2/health/live`` is 200 while the models load in
   a thread, ``/v2/health/ready`` is 503 until every one is loaded and self-tested.
3. On SIGTERM (``stop``): ready turns 503, uvicorn stops accepting and gives in-flight
   requests ``drain_s`` to finish; then the front ends stop, the models close, and
   telemetry is flushed.

Other front ends (gRPC, the OpenAI routes, systemd notification) plug in as
``ServeExtension``s.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

from ..errors import AccessError, EdgeRuntimeError, ServiceError
from .models import BundleRef, resolve_bundles
from .settings import ServeSettings

log = logging.getLogger(__name__)


class ServeExtension:
    """A front end or helper that runs beside the HTTP server; override what you need.

    ``routes`` are added to the HTTP app; ``start`` runs once the app exists (before the
    models are loaded); ``ready`` once every model is loaded and self-tested; ``tick``
    about once a second from the serving loop while it runs; ``stop`` on shutdown, after
    the HTTP server has drained. Each gets the ``app.ServeState``.
    """

    def routes(self) -> Sequence:
        return ()

    def start(self, state) -> None:
        pass

    def ready(self, state) -> None:
        pass

    def tick(self, state) -> None:
        pass

    def stop(self, grace_s: float) -> None:
        pass


def read_api_key(settings: ServeSettings) -> str | None:
    """The API key, or None; refuses a non-loopback host without one.

    Raises:
        AccessError: no key for a non-loopback host, or an unreadable or empty key file.
    """
    path = settings.api_key_file
    if path is None:
        if not settings.loopback() and not settings.insecure_no_auth:
            raise AccessError(
                f"refusing to serve on {settings.host} without an API key: anyone who can "
                "reach it could use the models; give --api-key-file FILE, bind "
                "--host 127.0.0.1, or pass --insecure-no-auth"
            )
        return None
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AccessError(f"cannot read the API key file {path}: {exc}") from None
    if len(key) < 16 or any(ch.isspace() for ch in key):
        raise AccessError(
            f"the API key in {path} must be one word of at least 16 characters "
            "(e.g. `openssl rand -hex 32 > key`)"
        )
    return key


def check_tls(settings: ServeSettings) -> None:
    for path in (settings.tls_certfile, settings.tls_keyfile):
        if path is not None and not Path(path).is_file():
            raise ServiceError(f"TLS file {path} does not exist")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one).

    Raises:
        ServiceError: the address does not resolve, or the port is taken or not allowed.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError as exc:
        raise ServiceError(f"cannot listen on {host!r}: {exc}; check --host") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ServiceError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port "
            "or --host"
        ) from None
    return sock


def make_hosts(refs: list[BundleRef], settings: ServeSettings, telemetry, observer):
    """A ``TensorModelHost`` or ``GgufModelHost`` per bundle (not loaded yet)."""
    from .llm import GgufModelHost
    from .models import TensorModelHost

    tensor, language = {}, {}
    for ref in refs:
        if ref.manifest.llm is not None:
            language[ref.name] = GgufModelHost(
                ref,
                settings.pubkey,
                threads=settings.threads,
                queue_size=settings.queue_size,
                telemetry=telemetry,
            )
        else:
            tensor[ref.name] = TensorModelHost(
                ref,
                settings.pubkey,
                threads=settings.threads,
                queue_size=settings.queue_size,
                max_batch_size=settings.max_batch_size,
                max_queue_delay_ms=settings.max_queue_delay_ms,
                telemetry=telemetry,
                observer=observer,
            )
    return tensor, language


def run_serve(
    settings: ServeSettings,
    stop: threading.Event | None = None,
    extensions: Sequence[ServeExtension] = (),
) -> int:
    """Serve ``settings.bundles`` until ``stop`` is set; returns the exit code (0).

    Raises:
        AccessError: a non-loopback host without an API key, or a bad key file.
        ServiceError: bad bundle names, missing TLS files.
        EdgeRuntimeError: a bundle does not verify or its engine cannot load it.
    """
    import uvicorn

    from ..telemetry.client import TelemetryClient
    from .app import build_app
    from .http11 import timed_h11
    from .metrics import ServeMetrics

    stop = stop or threading.Event()
    api_key = read_api_key(settings)
    check_tls(settings)
    refs = resolve_bundles(settings.bundles, settings.pubkey)
    telemetry_settings = settings.telemetry()
    client = TelemetryClient(telemetry_settings).start() if telemetry_settings else None
    observer = ServeMetrics([ref.name for ref in refs])
    tensor, language = make_hosts(refs, settings, client, observer)
    hosts = [*tensor.values(), *language.values()]
    routes = [route for extension in extensions for route in extension.routes()]
    app = build_app(
        settings,
        tensor,
        routes,
        language_models=language,
        metrics_registry=observer,
        api_key=api_key,
    )
    state = app.state.serve
    failure: list[BaseException] = []

    def load_all() -> None:
        try:
            for host in hosts:
                host.load()
        except BaseException as exc:  # reported by run_serve once the server is down
            failure.append(exc)
            stop.set()
            return
        if state.ready():
            log.info("ready: %s", ", ".join(ref.name for ref in refs))
            for extension in extensions:
                extension.ready(state)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=timed_h11(settings.header_timeout_s),
        ws="none",
        lifespan="off",
        log_config=None,
        access_log=False,
        ssl_certfile=str(settings.tls_certfile) if settings.tls_certfile else None,
        ssl_keyfile=str(settings.tls_keyfile) if settings.tls_keyfile else None,
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=max(1, round(settings.drain_s)),
        limit_concurrency=settings.max_connections,
        h11_max_incomplete_event_size=64 * 1024,
    )
    server = _uvicorn_server(config, stop, state, extensions)
    loader = threading.Thread(target=load_all, name="serve-loader", daemon=True)
    try:
        sock = bind(settings.host, settings.port)
        host, port = sock.getsockname()[:2]
        scheme = "https" if settings.tls_certfile else "http"
        log.info("listening on %s://%s:%s", scheme, host, port)
        for extension in extensions:
            extension.start(state)
        loader.start()
        server.run(sockets=[sock])
    finally:
        state.draining = True
        for extension in extensions:
            extension.stop(settings.drain_s)
        if loader.ident is not None:
            loader.join(timeout=settings.drain_s)
        for host in hosts:
            host.close(settings.drain_s)
        if client is not None:
            client.event("serve_stopped", served=[ref.name for ref in refs])
            client.stop()
        log.info("stopped")
    if failure:
        error = failure[0]
        if isinstance(error, EdgeRuntimeError):
            raise error
        raise ServiceError(f"loading the models failed: {type(error).__name__}: {error}")
    return 0


def _uvicorn_server(config, stop: threading.Event, state, extensions):
    """uvicorn's Server, stopped by ``stop`` (the CLI sets it on SIGTERM/SIGINT) instead
    of its own signal handlers, which re-raise the signal after a graceful shutdown and
    so would end the process with the signal's status instead of 0."""
    import contextlib

    import uvicorn

    config_drain_s = config.timeout_graceful_shutdown

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

        async def on_tick(self, counter: int) -> bool:
            if stop.is_set():
                if not state.draining:
                    log.info("stopping: in-flight requests get up to %g s", config_drain_s)
                state.draining = True  # ready answers 503 from now on
                return True
            if counter % 10 == 0:
                for extension in extensions:
                    extension.tick(state)
            return await super().on_tick(counter)

    return Server(config)
