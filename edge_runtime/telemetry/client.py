"""``TelemetryClient``: reports a device's health and metrics over MQTT, losing nothing.

Wraps paho-mqtt (callback API version 2) in one small class, in paho's own manner: bad
settings raise at once; network trouble is a state, never an exception; results of
asynchronous work arrive in callbacks. Threads:

- paho's network loop (connects, reconnects, receives PUBACKs);
- the publisher, which moves messages from the disk outbox to paho, keeping at most
  ``window`` unacknowledged, and deletes each one when its PUBACK arrives;
- the reporter, which every ``metrics_interval_s`` turns the in-process aggregates into a
  ``metrics`` message in the outbox.

Inference threads only call ``record`` (a lock, a few counters, one append), so telemetry
never blocks inference, whatever the network does.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from .. import __version__
from ..errors import TelemetryError
from ..settings import MqttSettings
from .aggregate import InferenceStats, VitalSigns, device_facts
from .outbox import Outbox
from .protocol import (
    MAX_PAYLOAD_BYTES,
    SCHEMA_VERSION,
    Command,
    CommandPayload,
    Kind,
    check_name,
    topic,
)

log = logging.getLogger(__name__)


def default_state_root() -> Path:
    home = os.environ.get("EDGEPACK_HOME") or Path.home() / ".local" / "share" / "edgepack"
    return Path(home) / "devices"


class TelemetrySettings(MqttSettings):
    """Where and how a device reports."""

    fleet: str = Field(description="fleet name (a topic level)")
    device_id: str = Field(description="device id: the MQTT client id and a topic level")
    state_dir: Path | None = Field(
        None, description="outbox and boot counter; default $EDGEPACK_HOME/devices/<device_id>"
    )
    metrics_interval_s: float = Field(10.0, gt=0, description="seconds between metrics messages")
    outbox_max_mb: float = Field(64.0, gt=0, description="outbox size bound; oldest dropped first")
    outbox_max_age_h: float = Field(168.0, gt=0, description="messages older than this are dropped")
    window: int = Field(200, ge=1, le=10000, description="unacknowledged messages in flight")
    resend_acked_s: float = Field(
        10.0,
        ge=0,
        description="after each (re)connect, send again what the broker acknowledged in the "
        "last this-many seconds before: a broker that crashed before saving it lost it "
        "(the collector drops duplicates)",
    )

    @field_validator("fleet", "device_id")
    @classmethod
    def _topic_safe(cls, value: str, info) -> str:
        return check_name(value, info.field_name.replace("_", " "))

    def resolved_state_dir(self) -> Path:
        return self.state_dir or default_state_root() / self.device_id


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()


class TelemetryClient:
    """Reports ``birth``, ``status``, ``metrics`` and ``events`` for one device."""

    def __init__(self, settings: TelemetrySettings) -> None:
        check_name(settings.fleet, "fleet")
        check_name(settings.device_id, "device id")
        self.settings = settings
        self.stats = InferenceStats()
        self._bundle: dict[str, Any] | None = None
        self._outbox: Outbox | None = None
        self._client = None
        self.boot = 0
        self.connected = threading.Event()
        self._stopping = threading.Event()
        self._reporting_done = threading.Event()
        self._wake = threading.Event()
        self._acked_mids: collections.deque[tuple[int, bool, str]] = collections.deque()
        self._commands: collections.deque[bytes] = collections.deque()
        self._resend_due = False  # set on connect: send the recently acknowledged again
        self._resent_mids: set[int] = set()
        self.resent = 0
        self._last_refusal = ""
        self._inflight: dict[int, tuple[int, float]] = {}  # mid -> (outbox id, sent at)
        self._last_sent_id = 0
        self._threads: list[threading.Thread] = []
        self._last_error: str | None = None
        self._last_connect_warning = -1e9
        self.publish_failures = 0

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> TelemetryClient:
        """Open the outbox, bump the boot counter, connect in the background."""
        import paho.mqtt.client as mqtt

        state_dir = self.settings.resolved_state_dir()
        self._outbox = Outbox(
            state_dir / "outbox.db",
            max_bytes=int(self.settings.outbox_max_mb * 2**20),
            max_age_s=self.settings.outbox_max_age_h * 3600,
            keep_acked_s=self.settings.resend_acked_s,
        )
        self.boot = self._outbox.next_boot()
        self._vitals = VitalSigns(state_dir)
        s = self.settings
        v5 = s.mqtt_version == "5"
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=s.device_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            **({} if v5 else {"clean_session": True}),
        )
        client.will_set(self._topic(Kind.STATUS), self._status("offline", "will"), 1, True)
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
        client.max_inflight_messages_set(min(s.window, 65000))
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        self._client = client
        client.connect_async(host, port, keepalive=s.keepalive_s)
        client.loop_start()
        for target, name in ((self._publisher, "publisher"), (self._reporter, "reporter")):
            thread = threading.Thread(target=target, name=f"telemetry-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Report a final metrics message, try to flush, announce ``offline``, disconnect."""
        if self._client is None:
            return
        self._reporting_done.set()  # no new reports: the flush below can reach empty
        self._threads[1].join(timeout=5)
        self._enqueue_metrics()
        self.flush(flush_timeout_s)
        self._stopping.set()
        self._wake.set()
        self._threads[0].join(timeout=5)
        if self.connected.is_set():
            # The boot's last seq: if its tail is lost, the collector counts it as missing.
            status = self._status("offline", "shutdown", last_seq=self._outbox.last_seq())
            info = self._client.publish(self._topic(Kind.STATUS), status, 1, True)
            info.wait_for_publish(timeout=2)
        self._client.disconnect()
        self._client.loop_stop()
        self._client = None
        if self._outbox is not None:
            self._outbox.close()

    def __enter__(self) -> TelemetryClient:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def flush(self, timeout_s: float) -> bool:
        """Wait until the outbox is empty (everything acknowledged); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._outbox is not None and self._outbox.depth() == 0:
                return True
            self._wake.set()
            time.sleep(0.05)
        return False

    # -- the hook a Runtime calls -------------------------------------------------------
    def record(self, seconds: float, ok: bool = True, tokens: int = 0, error: str | None = None):
        """One inference happened (called on the inference thread: must stay cheap)."""
        if error is not None:
            self._last_error = error
        self.stats.record(seconds, ok, tokens)

    def bundle_loaded(self, facts: dict[str, Any], signed_by: str) -> None:
        """The runtime loaded a bundle: remember it for ``birth`` and send an event."""
        self._bundle = facts
        self.event("bundle_loaded", bundle=facts, signed_by=signed_by)
        if self.connected.is_set():
            self._publish_birth()

    def event(self, name: str, level: str = "info", **data: Any) -> int:
        """Queue an ``events`` message; returns its seq.

        Raises:
            TelemetryError: the message would be larger than a collector accepts (64 KiB);
                nothing is queued and no seq is used.
        """
        return self._put(Kind.EVENTS, {"event": name, "level": level, "data": data})

    # -- internals -----------------------------------------------------------------------
    def _topic(self, kind: Kind) -> str:
        return topic(self.settings.fleet, self.settings.device_id, kind)

    def _status(self, state: str, reason: str, last_seq: int | None = None) -> bytes:
        body = {
            "schema": SCHEMA_VERSION,
            "ts": time.time(),
            "state": state,
            "boot": self.boot,
            "reason": reason,
        }
        if last_seq is not None:
            body["last_seq"] = last_seq
        return _json(body)

    def _put(self, kind: Kind, body: dict[str, Any]) -> int:
        if self._outbox is None:
            raise RuntimeError("TelemetryClient.start() was not called")

        def make(seq: int) -> bytes:
            payload = _json(
                {"schema": SCHEMA_VERSION, "ts": time.time(), "boot": self.boot, "seq": seq, **body}
            )
            if len(payload) > MAX_PAYLOAD_BYTES:
                # Refused here, not at the broker: Mosquitto drops the connection of a client
                # that sends more than its message_size_limit, and paho would resend it on
                # every reconnect, holding up everything behind it.
                raise TelemetryError(
                    f"{kind.value} message of {len(payload)} bytes: a collector accepts at "
                    f"most {MAX_PAYLOAD_BYTES}; keep event data small"
                )
            return payload

        seq = self._outbox.put(self._topic(kind), make)
        self._wake.set()
        return seq

    def _enqueue_metrics(self) -> int:
        figures = self.stats.snapshot()
        process, system = self._vitals.snapshot()
        figures.update(
            process=process,
            system=system,
            outbox={"depth": self._outbox.depth(), "dropped": self._outbox.dropped},
        )
        seq = self._put(Kind.METRICS, figures)
        if self._last_error is not None and figures["errors"]:
            error, self._last_error = self._last_error, None
            message = error if len(error) <= 2000 else error[:2000] + "…"
            self.event("inference_error", "error", message=message, count=figures["errors"])
        return seq

    def _publish_birth(self) -> None:
        body = {
            "schema": SCHEMA_VERSION,
            "ts": time.time(),
            "boot": self.boot,
            "runtime_version": __version__,
            "device": device_facts(),
            "bundle": self._bundle,
        }
        previous = self._outbox.previous_last_seq if self._outbox is not None else None
        if previous is not None:
            # What the last boot committed: its lost tail is missing, not invisible.
            body["previous_boot_last_seq"] = previous
        self._client.publish(self._topic(Kind.BIRTH), _json(body), 1, True)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            hint = (
                " (use --mqtt-version 3.1.1 for a broker without MQTT 5)"
                if "protocol" in str(reason_code).lower()
                else ""
            )
            log.warning("MQTT broker refused the connection: %s%s", reason_code, hint)
            return
        client.publish(self._topic(Kind.STATUS), self._status("online", "connected"), 1, True)
        self._publish_birth()
        client.subscribe(self._topic(Kind.CMD), qos=1)  # requests to this device
        self._resend_due = True
        self.connected.set()
        self._wake.set()

    def _on_connect_fail(self, client, userdata) -> None:
        now = time.monotonic()
        if now - self._last_connect_warning >= 60:  # keep trying, but say so once a minute
            self._last_connect_warning = now
            hint = (
                " If the broker is up but drops the connection, it may speak only MQTT "
                "3.1.1 (e.g. edge-collector --embedded-broker): use --mqtt-version 3.1.1."
                if self.settings.mqtt_version == "5"
                else ""
            )
            log.warning(
                "cannot connect to %s; the outbox keeps everything meanwhile.%s",
                self.settings.broker,
                hint,
            )

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected.is_set():
            log.info("MQTT disconnected (%s); outbox keeps everything until reconnect", reason_code)
        self.connected.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        # Runs on paho's thread, possibly while paho holds its own locks: only hand over.
        self._acked_mids.append(
            (mid, bool(getattr(reason_code, "is_failure", False)), str(reason_code))
        )
        self._wake.set()

    def _on_message(self, client, userdata, message) -> None:
        # paho's thread: only hand over; the publisher answers (the answer is an outbox write).
        self._commands.append(bytes(message.payload))
        self._wake.set()

    def _answer_commands(self) -> None:
        while self._commands:
            payload = self._commands.popleft()
            try:
                command = CommandPayload.model_validate_json(payload)
            except ValidationError as exc:
                log.warning("ignored a malformed command on %s: %s", self._topic(Kind.CMD), exc)
                continue
            if command.command is Command.REPORT_COUNTS:
                counts = self._outbox.counts()  # as of just before this answer
                self.event("outbox_counts", request_id=command.id, **counts)

    def _publisher(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            try:
                if self._resend_due and self.connected.is_set():
                    self._resend_acknowledged()  # before settling acks: they purge it
                self._answer_commands()
                self._settle_acks()
                if self.connected.is_set():
                    self._send_more()
            except Exception:  # never let the publisher die: the outbox holds the data
                self.publish_failures += 1
                log.exception("telemetry publisher error; retrying")
                time.sleep(0.5)

    def _resend_acknowledged(self) -> None:
        """Send again what the broker acknowledged shortly before this connection.

        A broker acknowledges a message before it saves it; one that crashed in between came
        back without it. The copies are duplicates for a broker that did not crash, and the
        collector stores each (device, boot, seq) once.
        """
        self._resend_due = False
        self._resent_mids.clear()  # earlier copies still in flight settle nothing either way
        for message in self._outbox.acknowledged():
            info = self._client.publish(message.topic, message.payload, qos=1)
            self._resent_mids.add(info.mid)
            self.resent += 1

    def _settle_acks(self) -> None:
        delivered, refused = [], []
        while self._acked_mids:
            mid, failed, reason = self._acked_mids.popleft()
            if mid in self._resent_mids:  # a copy of a settled message: nothing to do
                self._resent_mids.discard(mid)
                continue
            entry = self._inflight.pop(mid, None)
            if entry is None:
                continue
            if failed:
                refused.append(entry[0])
                self._last_refusal = reason
            else:
                delivered.append(entry[0])
        self._outbox.ack(delivered)
        if refused:
            # The broker answered but refused (e.g. an ACL says "Not authorized"): resending
            # cannot help, so the message is dropped, counted, and said out loud.
            self._outbox.ack(refused, dropped=True)
            log.warning(
                "broker refused %d message(s): %s; check the broker's ACL for %s",
                len(refused),
                self._last_refusal,
                self._topic(Kind.METRICS),
            )

    def _send_more(self) -> None:
        room = self.settings.window - len(self._inflight)
        if room <= 0:
            return
        for message in self._outbox.after(self._last_sent_id, room):
            info = self._client.publish(message.topic, message.payload, qos=1)
            # paho keeps and resends unacknowledged QoS 1 messages after a reconnect, so
            # an entry stays in flight across outages until its PUBACK arrives.
            self._inflight[info.mid] = (message.id, time.monotonic())
            self._last_sent_id = message.id

    def _reporter(self) -> None:
        interval = self.settings.metrics_interval_s
        next_at = time.monotonic() + interval
        # A fixed schedule, not "sleep interval after each report": reports stay on the
        # cadence however long building one takes.
        while not self._reporting_done.wait(max(0.0, next_at - time.monotonic())):
            next_at = max(next_at + interval, time.monotonic() - interval)
            try:
                self._enqueue_metrics()
            except Exception:
                log.exception("could not queue a metrics report")
