"""An in-process MQTT broker (amqtt), so one machine needs nothing else for a demo fleet.

amqtt speaks MQTT 3.1.1 only: with it, agents and the collector use ``--mqtt-version
3.1.1``, and shared subscriptions (an MQTT 5 feature) are not available. For a real fleet
use Mosquitto (or any MQTT 5 broker) with persistence on; see docs/telemetry.md.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from .errors import CollectorError

log = logging.getLogger(__name__)


class EmbeddedBroker:
    """amqtt running on its own event loop in a daemon thread."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker = None
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 10.0) -> EmbeddedBroker:
        try:
            from amqtt.broker import Broker
        except ImportError:
            raise CollectorError(
                "--embedded-broker needs amqtt: pip install 'edgepack[collector-broker]'"
            ) from None
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "auth": {"allow-anonymous": True, "plugins": ["auth_anonymous"]},
            "topic-check": {"enabled": False},
        }
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._broker = Broker(config, loop=self._loop)
                self._loop.run_until_complete(self._broker.start())
            except BaseException as exc:  # report to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s) or failure:
            raise CollectorError(
                f"the embedded broker could not listen on {self.host}:{self.port}: "
                f"{failure[0] if failure else 'timed out'}"
            )
        log.info("embedded MQTT 3.1.1 broker listening on %s:%d", self.host, self.port)
        return self

    def stop(self) -> None:
        if self._loop is None or self._broker is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            future.result(timeout=10)
        except Exception:  # shutting down anyway
            log.debug("embedded broker shutdown raised", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
