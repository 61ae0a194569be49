"""The collector's MQTT side: subscribe, queue, store in batches, acknowledge after commit.

Messages are acknowledged to the broker (MQTT 5 manual PUBACK) only after the transaction
that stores them commits, so a collector crash loses nothing: the broker redelivers. The
broker keeps the collector's session (``clean_start`` off, a session expiry) across
collector restarts; run the broker with persistence so it also survives broker restarts.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from edge_runtime.telemetry.protocol import fleet_filter

from .ingest import Ingestor, RawMessage
from .settings import CollectorSettings
from .storage import Storage

log = logging.getLogger(__name__)


class Collector:
    """Subscribes to a fleet's telemetry and stores it. ``start``/``stop``, or a context."""

    def __init__(self, settings: CollectorSettings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        self.ingestor = Ingestor(storage)
        self._queue: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self._client = None

    @property
    def subscription(self) -> str:
        topic_filter = fleet_filter(self.settings.fleet)
        group = self.settings.shared_group
        return f"$share/{group}/{topic_filter}" if group else topic_filter

    def start(self) -> Collector:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        s = self.settings
        v5 = s.mqtt_version == "5"
        if s.shared_group and not v5:
            raise ValueError("--shared-group needs MQTT 5 (shared subscriptions)")
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=s.resolved_client_id(),
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            manual_ack=True,
            **({} if v5 else {"clean_session": False}),
        )
        if s.username:
            client.username_pw_set(
                s.username, s.password.get_secret_value() if s.password else None
            )
        host, port, tls = s.broker_address()
        if tls:
            client.tls_set(
                ca_certs=str(s.tls_ca) if s.tls_ca else None,
                certfile=str(s.tls_cert) if s.tls_cert else None,
                keyfile=str(s.tls_key) if s.tls_key else None,
            )
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = lambda *args: self.subscribed.set()
        connect_args = {}
        if v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = s.session_expiry_s
            properties.ReceiveMaximum = 1000
            connect_args = {"clean_start": False, "properties": properties}
        client.connect_async(host, port, keepalive=s.keepalive_s, **connect_args)
        self._client = client
        client.loop_start()
        for target, name in ((self._writer, "writer"), (self._watchdog, "heartbeats")):
            thread = threading.Thread(target=target, name=f"collector-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=10)
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- paho callbacks (network thread): hand over, never block ---------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT broker refused the collector: %s", reason_code)
            return
        client.subscribe(self.subscription, qos=1)
        self.connected.set()
        log.info("collector connected, subscribed to %s", self.subscription)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        self.subscribed.clear()
        if not self._stopping.is_set():
            log.warning("collector lost the broker (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, message) -> None:
        self._queue.put((message, time.time()))

    # -- writer: batches, one transaction each, then PUBACKs -------------------------------
    def _writer(self) -> None:
        batch_size = self.settings.batch_size
        while not (self._stopping.is_set() and self._queue.empty()):
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            pending = [first]
            while len(pending) < batch_size:
                try:
                    pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            raw = [
                RawMessage(m.topic, m.payload, received, bool(m.retain)) for m, received in pending
            ]
            while True:
                try:
                    self.ingestor.ingest(raw)
                    break
                except Exception:
                    # Storage is down: keep the batch, unacknowledged, and retry; if we die
                    # meanwhile, the broker redelivers it to our session.
                    log.exception("storing %d messages failed; retrying", len(raw))
                    if self._stopping.wait(1.0):
                        return
            client = self._client
            if client is not None:
                for message, _ in pending:
                    if message.qos > 0:
                        client.ack(message.mid, message.qos)

    def _watchdog(self) -> None:
        interval = min(5.0, self.settings.heartbeat_timeout_s / 3)
        while not self._stopping.wait(interval):
            try:
                cutoff = time.time() - self.settings.heartbeat_timeout_s
                for device in self.storage.mark_silent_offline(cutoff):
                    log.warning("device %s missed its heartbeats: marked offline", device)
            except Exception:
                log.exception("heartbeat check failed")

    def backlog(self) -> int:
        return self._queue.qsize()
