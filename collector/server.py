"""Wiring for ``edge-collector serve``: broker (optional), storage, MQTT, HTTP."""

from __future__ import annotations

import logging
import threading

from .settings import CollectorSettings

log = logging.getLogger(__name__)


def run_server(settings: CollectorSettings, stop: threading.Event | None = None) -> None:
    """Run until ``stop`` is set, or SIGINT/SIGTERM when ``stop`` is None."""
    from .broker import EmbeddedBroker
    from .http import make_server, serve_in_thread
    from .service import Collector
    from .storage import Storage

    if stop is None:
        from edge_runtime.cli_support import stop_on_signals

        stop = threading.Event()
        stop_on_signals(stop)
    broker = None
    if settings.embedded_broker:
        host, port, _ = settings.broker_address()
        # The collector reads every topic: by its user name, or by its client id when
        # clients are anonymous. Every other client is a device, limited to its own topics.
        reader = settings.username or settings.resolved_client_id()
        broker = EmbeddedBroker(
            host,
            port,
            password_file=settings.broker_password_file,
            allow_anonymous=settings.allow_anonymous,
            readers=(reader,),
        ).start()
        log.warning("embedded broker speaks MQTT 3.1.1 only: run agents with --mqtt-version 3.1.1")
    storage = Storage(settings.db)
    collector = Collector(settings, storage).start()
    http = make_server(
        storage, collector.ingestor.stats, settings.http_host, settings.http_port, collector
    )
    serve_in_thread(http)
    host, port = http.server_address[:2]
    log.info("fleet page on http://%s:%d/ (API /api/devices, Prometheus /metrics)", host, port)
    try:
        stop.wait()
    finally:
        http.shutdown()
        collector.stop()
        storage.close()
        if broker is not None:
            broker.stop()
