"""The collector's MQTT side: subscribe, store in batches, acknowledge after commit.

One ingest thread owns the connection: it reads a batch of PUBLISH packets, stores them
in one transaction, and only then sends their PUBACKs, so a collector crash or a database
outage loses nothing: unacknowledged messages stay with the broker, which redelivers them
to our persistent session (``clean_start`` off, a session expiry). Run the broker with
persistence so the session also survives a broker restart (docs/telemetry.md).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time

from edge_runtime.telemetry.protocol import fleet_filter

from .errors import StorageError
from .ingest import Ingestor, RawMessage
from .settings import CollectorSettings
from .storage import Storage
from .wire import MqttError, Subscriber

log = logging.getLogger(__name__)


class Collector:
    """Subscribes to a fleet's telemetry and stores it. ``start``/``stop``, or a context."""

    def __init__(self, settings: CollectorSettings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        self.ingestor = Ingestor(storage)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.reconnects = 0
        self.sessions_lost = 0  # new sessions the broker gave us while ours should live
        self._alive_ts: float | None = None  # when this process last held its session

    @property
    def subscription(self) -> str:
        topic_filter = fleet_filter(self.settings.fleet)
        group = self.settings.shared_group
        return f"$share/{group}/{topic_filter}" if group else topic_filter

    def start(self) -> Collector:
        for target, name in ((self._ingest_loop, "ingest"), (self._watchdog, "heartbeats")):
            thread = threading.Thread(target=target, name=f"collector-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def backlog(self) -> int:
        """Messages received but not yet stored (they are stored before the next read)."""
        return 0

    def _subscriber(self) -> Subscriber:
        s = self.settings
        host, port, tls = s.broker_address()
        context = None
        if tls:
            context = ssl.create_default_context(cafile=str(s.tls_ca) if s.tls_ca else None)
            if s.tls_cert:
                context.load_cert_chain(str(s.tls_cert), str(s.tls_key) if s.tls_key else None)
        return Subscriber(
            host,
            port,
            s.resolved_client_id(),
            version=5 if s.mqtt_version == "5" else 4,
            keepalive=s.keepalive_s,
            session_expiry=s.session_expiry_s,
            # Several batches in flight: the broker keeps sending while a batch is stored.
            receive_maximum=min(65535, max(4 * s.batch_size, 100)),
            username=s.username,
            password=s.password.get_secret_value() if s.password else None,
            tls=context,
        )

    def _ingest_loop(self) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            subscriber = self._subscriber()
            try:
                subscriber.connect()
                subscriber.subscribe(self.subscription, qos=1)
            except (OSError, MqttError) as exc:
                log.warning("cannot reach the broker (%s); retrying in %.1fs", exc, delay)
                subscriber.close()
                self._stopping.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.5
            self._check_session(subscriber.session_present)
            self.connected.set()
            self.subscribed.set()
            try:
                self._pump(subscriber)
            except (OSError, MqttError) as exc:
                if not self._stopping.is_set():
                    self.reconnects += 1
                    log.warning("collector lost the broker (%s); reconnecting", exc)
            finally:
                self.connected.clear()
                self.subscribed.clear()
                subscriber.close()

    def _check_session(self, present: bool) -> None:
        """Say loudly when the broker forgot a session it should have kept.

        The broker keeps our session (subscription and queued messages) for
        ``session_expiry_s`` after we leave. A new session before that means the broker lost
        its state (a crash without autosave, see collector/mosquitto.conf): whatever it held
        for us, and whatever devices published before we subscribed again, is gone.
        """
        client_id = self.settings.resolved_client_id()
        now = time.time()
        alive = self._alive_ts
        try:
            stored = self.storage.session_alive_ts(client_id)
            alive = max(alive or 0.0, stored or 0.0) or None
        except StorageError:
            pass  # the database is down: what this process remembers will do
        expected = alive is not None and now - alive < self.settings.session_expiry_s
        if present or not expected:
            log.info(
                "collector subscribed to %s (session %s)",
                self.subscription,
                "resumed" if present else "new",
            )
        else:
            self.sessions_lost += 1
            message = (
                f"the broker gave collector {client_id} a new session, {now - alive:.0f}s after "
                f"it last held one (session expiry {self.settings.session_expiry_s}s): the "
                "broker lost its state, and the messages it held for the collector, or that "
                "devices sent before it subscribed again, are lost (they count as missing). "
                "Run the broker with the shipped collector/mosquitto.conf (autosave_on_changes)."
            )
            log.warning("%s", message)
            try:
                self.storage.add_collector_event(client_id, "warning", "session_lost", message)
            except StorageError as exc:
                log.warning("could not record the lost session in the database: %s", exc)
        self._touch_session(now)

    def _touch_session(self, now: float) -> None:
        self._alive_ts = now
        try:
            self.storage.touch_session(self.settings.resolved_client_id(), now)
        except StorageError as exc:
            log.debug("could not record the session's time: %s", exc)

    def _pump(self, subscriber: Subscriber) -> None:
        while not self._stopping.is_set():
            messages = subscriber.read(self.settings.batch_size, timeout=0.2)
            if not messages:
                continue
            received = time.time()
            raw = [RawMessage(m.topic, m.payload, received, m.retain, m.size) for m in messages]
            prepared = self.ingestor.prepare(raw)
            while True:
                try:
                    self.ingestor.commit(prepared)
                    break
                except StorageError as exc:
                    # The database is down, which is no message's fault: keep the rest of the
                    # batch unacknowledged and retry; the next attempt reconnects. If we die
                    # meanwhile, the broker redelivers it to our session.
                    log.warning(
                        "storing %d messages failed (%s); retrying", len(prepared.pending), exc
                    )
                    if self._stopping.wait(1.0):
                        return
                    subscriber.ping()  # keep the connection while we wait
            subscriber.ack(messages)

    def _watchdog(self) -> None:
        interval = min(5.0, self.settings.heartbeat_timeout_s / 3)
        while not self._stopping.wait(interval):
            if self.subscribed.is_set():
                self._touch_session(time.time())
            try:
                cutoff = time.time() - self.settings.heartbeat_timeout_s
                for device in self.storage.mark_silent_offline(cutoff):
                    log.warning("device %s missed its heartbeats: marked offline", device)
            except Exception:
                log.exception("heartbeat check failed")
