"""Tests for edge_runtime/telemetry/client.py against a real Mosquitto (the ``mosquitto`` fixture).

A plain paho client subscribes to ``edgepack/v1/#`` before the device starts and records
everything; every payload it sees must also validate against the protocol's models.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_runtime import __version__
from edge_runtime.errors import InputSignatureError, TelemetryError
from edge_runtime.runtime import Runtime
from edge_runtime.selftest import load_vectors
from edge_runtime.telemetry.aggregate import device_facts
from edge_runtime.telemetry.client import TelemetryClient, TelemetrySettings
from edge_runtime.telemetry.outbox import Outbox
from edge_runtime.telemetry.protocol import PAYLOAD_MODELS, Kind, parse_topic
from tests.brokers import free_port

REPO = Path(__file__).resolve().parents[3]
FLEET = "plant-7"
DEVICE = "pi-1"
TIMEOUT_S = 15.0


class Listener:
    """A plain paho subscriber to ``edgepack/v1/#`` that keeps every message it receives.

    After a broker restart it is back within a fraction of a second, well before a device
    (which waits at least a second), and its session persists (clean start off, a session
    expiry), so it misses nothing the device publishes.
    """

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, Kind, dict, bool]] = []
        self.invalid: list[str] = []
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"listener-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *args: self._subscribed.set()
        client.on_disconnect = lambda *args: self._subscribed.clear()
        client.on_message = self._on_message
        client.reconnect_delay_set(min_delay=0.05, max_delay=0.2)
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 600
        client.connect_async("127.0.0.1", port, clean_start=False, properties=properties)
        client.loop_start()
        self._client = client
        self.wait_subscribed()

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    def wait_subscribed(self) -> None:
        if not self._subscribed.wait(TIMEOUT_S):
            raise TimeoutError("the listener could not subscribe")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        client.subscribe("edgepack/v1/#", qos=1)

    def _on_message(self, client, userdata, message) -> None:
        try:  # the device must speak the protocol; ``close`` reports what did not
            _, _, kind = parse_topic(message.topic)
            if kind is Kind.CMD:
                return  # requests to devices: not what a device sends
            payload = json.loads(message.payload)
            PAYLOAD_MODELS[kind].model_validate(payload)
        except Exception as exc:
            self.invalid.append(f"{message.topic} {message.payload!r}: {exc}")
            return
        with self._changed:
            self.messages.append((message.topic, kind, payload, bool(message.retain)))
            self._changed.notify_all()

    def of(self, kind: Kind, device: str = DEVICE) -> list[dict]:
        with self._changed:
            return [
                payload
                for name, k, payload, _ in self.messages
                if k is kind and parse_topic(name)[1] == device
            ]

    def wait_for(
        self, kind: Kind, until: Callable[[list[dict]], bool], timeout_s: float = TIMEOUT_S
    ) -> list[dict]:
        """Wait until ``until(payloads of kind)`` holds; return those payloads."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                payloads = [p for _, k, p, _ in self.messages if k is kind]
                if until(payloads):
                    return payloads
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {kind.value}: {self.messages}")
                self._changed.wait(left)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        assert self.invalid == [], "messages outside the protocol"


def wait_until(condition: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def outbox_depth(state_dir: Path) -> int:
    """The device's outbox depth, read through a second connection to its database."""
    outbox = Outbox(state_dir / "outbox.db")
    try:
        return outbox.depth()
    finally:
        outbox.close()


def event_names(payloads: list[dict]) -> list[str]:
    return [payload["event"] for payload in payloads]


@pytest.fixture
def listener(mosquitto):
    opened = Listener(mosquitto.port)
    yield opened
    opened.close()


@pytest.fixture
def state_dir(tmp_path) -> Path:
    return tmp_path / "device-state"


@pytest.fixture
def make_client(mosquitto, state_dir):
    """Build and start TelemetryClients for the test's broker; stop them all afterwards."""
    started: list[TelemetryClient] = []

    def make(**changes) -> TelemetryClient:
        settings = {
            "fleet": FLEET,
            "device_id": DEVICE,
            "broker": mosquitto.url,
            "state_dir": state_dir,
            "metrics_interval_s": 60.0,
            "keepalive_s": 5,
            **changes,
        }
        client = TelemetryClient(TelemetrySettings(**settings)).start()
        started.append(client)
        return client

    yield make
    for client in started:
        client.stop(flush_timeout_s=0.5)


@pytest.fixture
def client(make_client, listener) -> TelemetryClient:
    started = make_client()
    assert started.connected.wait(TIMEOUT_S)
    return started


def test_announces_online_and_birth_with_the_device_facts(make_client, listener, mosquitto):
    client = make_client()

    (status,) = listener.wait_for(Kind.STATUS, lambda found: len(found) >= 1)
    (birth,) = listener.wait_for(Kind.BIRTH, lambda found: len(found) >= 1)

    assert (status["state"], status["boot"], status["reason"]) == ("online", 1, "connected")
    assert birth["boot"] == client.boot == 1
    assert birth["runtime_version"] == __version__
    assert birth["device"] == device_facts()
    assert birth["bundle"] is None


def test_status_and_birth_are_retained_for_later_subscribers(client, listener, mosquitto):
    listener.wait_for(Kind.BIRTH, lambda found: len(found) >= 1)

    latecomer = Listener(mosquitto.port)
    try:
        latecomer.wait_for(Kind.BIRTH, lambda found: len(found) >= 1)
        latecomer.wait_for(Kind.STATUS, lambda found: len(found) >= 1)
        retained = {kind for _, kind, _, retain in latecomer.messages if retain}
    finally:
        latecomer.close()

    assert retained == {Kind.STATUS, Kind.BIRTH}


def test_events_arrive_with_boot_and_seq(client, listener):
    first = client.event("door_opened", sensor=3)
    second = client.event("overheat", "warning", temperature_c=81.5)

    events = listener.wait_for(Kind.EVENTS, lambda found: len(found) >= 2)

    assert (first, second) == (1, 2)
    assert [(e["boot"], e["seq"]) for e in events] == [(1, 1), (1, 2)]
    assert [(e["event"], e["level"]) for e in events] == [
        ("door_opened", "info"),
        ("overheat", "warning"),
    ]
    assert events[1]["data"] == {"temperature_c": 81.5}


def test_metrics_arrive_every_interval_with_the_recorded_counts(make_client, listener):
    client = make_client(metrics_interval_s=0.3)
    assert client.connected.wait(TIMEOUT_S)
    for _ in range(7):
        client.record(0.01)
    client.record(0.02, ok=False, error="input too large")

    metrics = listener.wait_for(
        Kind.METRICS,
        lambda found: len(found) >= 3 and sum(m["inferences"] for m in found) >= 8,
    )
    (error,) = listener.wait_for(Kind.EVENTS, lambda found: len(found) >= 1)

    assert sum(m["inferences"] for m in metrics) == 8
    assert sum(m["errors"] for m in metrics) == 1
    assert sum(m["latency"]["count"] for m in metrics) == 8
    assert max(m["latency"]["max_ms"] or 0 for m in metrics) == pytest.approx(20.0)
    assert [m["seq"] for m in metrics] == sorted(m["seq"] for m in metrics)
    assert all(0.2 <= m["interval_s"] <= 2.0 for m in metrics)
    gaps = np.diff([m["ts"] for m in metrics])
    assert (gaps > 0.1).all() and (gaps < 2.0).all()
    assert metrics[0]["process"]["rss_mb"] > 0
    assert set(metrics[0]["outbox"]) == {"depth", "dropped"}
    assert (error["event"], error["level"]) == ("inference_error", "error")
    assert error["data"] == {"message": "input too large", "count": 1}


def test_flush_waits_until_the_outbox_is_empty(client, listener, state_dir):
    for index in range(50):
        client.event("tick", index=index)

    flushed = client.flush(TIMEOUT_S)
    depth = outbox_depth(state_dir)

    assert flushed is True
    assert depth == 0
    events = listener.wait_for(Kind.EVENTS, lambda found: len(found) >= 50)
    assert [e["data"]["index"] for e in events] == list(range(50))


def test_stop_reports_final_metrics_and_offline_shutdown(client, listener, state_dir):
    client.record(0.005)
    client.record(0.005)

    client.stop()

    statuses = listener.wait_for(Kind.STATUS, lambda found: len(found) >= 2)
    (metrics,) = listener.wait_for(Kind.METRICS, lambda found: len(found) >= 1)
    assert [(s["state"], s["reason"]) for s in statuses] == [
        ("online", "connected"),
        ("offline", "shutdown"),
    ]
    assert statuses[-1]["boot"] == 1
    assert metrics["inferences"] == 2
    assert outbox_depth(state_dir) == 0


def test_a_restarted_client_starts_a_new_boot(make_client, listener):
    first = make_client()
    assert first.connected.wait(TIMEOUT_S)
    first.event("hello")
    first.stop()

    second = make_client()
    seq = second.event("hello")

    events = listener.wait_for(Kind.EVENTS, lambda found: any(e["boot"] == 2 for e in found))
    births = listener.wait_for(Kind.BIRTH, lambda found: len(found) >= 2)
    assert second.boot == 2
    assert seq == 1
    # (1, 1) comes twice: the new boot sends again what the broker acknowledged just before.
    assert sorted(set((e["boot"], e["seq"]) for e in events)) == [(1, 1), (2, 1)]
    assert [b["boot"] for b in births] == [1, 2]


def test_events_wait_out_a_broker_outage_and_arrive_in_order(
    client, listener, mosquitto, state_dir
):
    client.event("before")
    assert client.flush(TIMEOUT_S)
    mosquitto.stop()
    wait_until(lambda: not client.connected.is_set() and not listener.subscribed)

    seqs = [client.event("during", index=index) for index in range(20)]
    depth_during = outbox_depth(state_dir)
    mosquitto.start()
    listener.wait_subscribed()

    events = listener.wait_for(Kind.EVENTS, lambda found: len({e["seq"] for e in found}) >= 21)
    assert client.flush(TIMEOUT_S)
    first_arrivals = list(dict.fromkeys(e["seq"] for e in events))  # QoS 1 may repeat one
    assert seqs == list(range(2, 22))
    assert depth_during == 20
    assert first_arrivals == list(range(1, 22))
    assert [e["data"]["index"] for e in events if e["event"] == "during"][:20] == list(range(20))
    assert outbox_depth(state_dir) == 0


def test_an_unreachable_broker_never_raises_and_nothing_is_lost(make_client, state_dir):
    client = make_client(broker=f"mqtt://127.0.0.1:{free_port()}")

    seqs = [client.event("offline_work", index=index) for index in range(5)]
    client.record(0.01)

    assert seqs == [1, 2, 3, 4, 5]
    assert not client.connected.is_set()
    assert client.flush(0.2) is False
    assert outbox_depth(state_dir) == 5


DEVICE_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from edge_runtime.telemetry.client import TelemetryClient, TelemetrySettings

    settings = TelemetrySettings(
        fleet="plant-7", device_id="pi-1", broker=sys.argv[1], state_dir=sys.argv[2]
    )
    client = TelemetryClient(settings).start()
    if not client.connected.wait(15):
        sys.exit(3)
    client.event("about_to_die")
    client.flush(15)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_killed_device_leaves_its_will(listener, mosquitto, state_dir):
    process = subprocess.run(
        [sys.executable, "-c", DEVICE_CHILD, mosquitto.url, str(state_dir)],
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )

    assert process.returncode == -9, process.stderr.decode()
    statuses = listener.wait_for(Kind.STATUS, lambda found: len(found) >= 2)
    assert [(s["state"], s["reason"], s["boot"]) for s in statuses] == [
        ("online", "connected", 1),
        ("offline", "will", 1),
    ]
    assert event_names(listener.of(Kind.EVENTS)) == ["about_to_die"]


@pytest.mark.parametrize(
    ("fleet", "device_id"),
    [
        (FLEET, "pi/1"),
        (FLEET, "pi+1"),
        (FLEET, "#"),
        (FLEET, "pi 1"),
        (FLEET, ""),
        (FLEET, "p" * 129),
        ("plant/7", DEVICE),
        ("+", DEVICE),
    ],
)
def test_an_invalid_fleet_or_device_id_is_rejected_at_construction(tmp_path, fleet, device_id):
    # The settings refuse it (a one-line settings error at the CLI), before any client.
    with pytest.raises(ValueError, match="is not a valid name"):
        TelemetrySettings(fleet=fleet, device_id=device_id, state_dir=tmp_path)


def test_events_before_start_are_a_programming_error(tmp_path):
    client = TelemetryClient(TelemetrySettings(fleet=FLEET, device_id=DEVICE, state_dir=tmp_path))

    with pytest.raises(RuntimeError, match="start"):
        client.event("too_early")


# -- the Runtime hook ------------------------------------------------------------------------
@pytest.fixture
def runtime(cnn_bundle, keypair, client):
    with Runtime.open(cnn_bundle, keypair[1], telemetry=client) as opened:
        yield opened


def samples(runtime: Runtime) -> list[dict[str, np.ndarray]]:
    inputs, _ = load_vectors(runtime.model_dir / runtime.manifest.selftest.path)
    count = runtime.manifest.selftest.count
    return [{name: value[i : i + 1] for name, value in inputs.items()} for i in range(count)]


def test_opening_a_bundle_reports_it(runtime, listener):
    (loaded,) = listener.wait_for(Kind.EVENTS, lambda found: len(found) >= 1)
    births = listener.wait_for(Kind.BIRTH, lambda found: any(b["bundle"] for b in found))

    assert loaded["event"] == "bundle_loaded"
    assert loaded["data"] == {"bundle": runtime.bundle_facts(), "signed_by": runtime.signed_by}
    assert births[-1]["bundle"] == runtime.bundle_facts()
    assert births[-1]["bundle"]["name"] == runtime.manifest.name


def test_run_records_inferences_and_errors(runtime, client, listener):
    inputs = samples(runtime)
    for sample in inputs:
        runtime.run(sample)
    with pytest.raises(InputSignatureError):
        runtime.run({"image": np.zeros((1, 1, 7, 7), dtype=np.float32)})

    client.stop()

    (metrics,) = listener.wait_for(Kind.METRICS, lambda found: len(found) >= 1)
    events = listener.wait_for(Kind.EVENTS, lambda found: "inference_error" in event_names(found))
    assert metrics["inferences"] == len(inputs) + 1
    assert metrics["errors"] == 1
    assert metrics["latency"]["count"] == len(inputs) + 1
    assert metrics["latency"]["p50_ms"] > 0
    error = events[event_names(events).index("inference_error")]
    assert error["level"] == "error"
    assert "expected image: float32[batch, 1, 8, 8]" in error["data"]["message"]
    assert error["data"]["count"] == 1


def test_selftest_reports_an_event(runtime, listener):
    report = runtime.selftest()

    events = listener.wait_for(Kind.EVENTS, lambda found: "selftest" in event_names(found))
    selftest = events[event_names(events).index("selftest")]
    assert report.passed
    assert selftest["level"] == "info"
    assert selftest["data"]["passed"] is True
    assert selftest["data"]["vectors"] == report.vectors == runtime.manifest.selftest.count
    assert selftest["data"]["max_abs_error"] == pytest.approx(report.max_abs_error)
    assert selftest["data"]["failures"] == []


def test_messages_the_broker_refuses_are_counted_as_dropped(tmp_path):
    # The PUBACK seam, driven directly: Mosquitto 2.0 resets the connection right after
    # refusing a publish, and a TCP reset can swallow the refusal itself, so a live
    # broker makes this timing-dependent (see docs/telemetry.md, broker requirements).
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    client = TelemetryClient(
        TelemetrySettings(
            broker="mqtt://127.0.0.1:9",
            fleet="f",
            device_id="acl",
            state_dir=tmp_path / "device",
            metrics_interval_s=3600,
        )
    ).start()
    try:
        for _ in range(3):
            client.event("probe")
        rows = client._outbox.after(0, 10)
        refused, delivered = (
            ReasonCode(PacketTypes.PUBACK, "Not authorized"),
            ReasonCode(PacketTypes.PUBACK, "Success"),
        )
        for mid, row in enumerate(rows, start=1):
            client._inflight[mid] = (row.id, time.monotonic())
        client._on_publish(None, None, 1, refused, None)
        client._on_publish(None, None, 2, refused, None)
        client._on_publish(None, None, 3, delivered, None)
        client._settle_acks()
        depth, dropped = client._outbox.depth(), client._outbox.dropped
    finally:
        client.stop(flush_timeout_s=0.1)

    assert (depth, dropped) == (0, 2)


# -- the device's own record: the last seq of each boot, and counts on request -----------------
def test_the_next_birth_reports_the_last_seq_the_previous_boot_committed(
    make_client, listener, mosquitto
):
    first = make_client()
    listener.wait_for(Kind.BIRTH, lambda found: len(found) >= 1)
    mosquitto.stop()  # what the first boot commits now never leaves the device
    tail = [first.event("unsent", index=index) for index in range(3)]
    first.stop(flush_timeout_s=0.1)  # its final metrics is seq 4: the boot ends at 4
    mosquitto.start()
    listener.wait_subscribed()

    second = make_client()
    births = listener.wait_for(Kind.BIRTH, lambda found: any(b["boot"] == 2 for b in found))

    first_birth = next(b for b in births if b["boot"] == 1)
    second_birth = next(b for b in births if b["boot"] == 2)
    assert tail == [1, 2, 3]
    assert "previous_boot_last_seq" not in first_birth  # a first boot has none
    assert second_birth["previous_boot_last_seq"] == 4
    assert second.boot == 2


def test_a_clean_stop_says_the_boots_last_seq(client, listener):
    client.event("one")
    client.event("two")
    client.stop()

    statuses = listener.wait_for(
        Kind.STATUS, lambda found: any(s["reason"] == "shutdown" for s in found)
    )

    shutdown = next(s for s in statuses if s["reason"] == "shutdown")
    assert shutdown["last_seq"] == 3  # two events, then the final metrics


def test_report_counts_on_request_answers_with_an_event(client, listener, mosquitto):
    for index in range(4):
        client.event("work", index=index)
    assert client.flush(TIMEOUT_S)
    requester = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "fleet-owner", protocol=mqtt.MQTTv5)
    requester.connect("127.0.0.1", mosquitto.port)
    requester.loop_start()
    command_topic = f"edgepack/v1/{FLEET}/{DEVICE}/cmd"
    try:
        requester.publish(command_topic, b'{"schema": 1, "ts": 0, "id": "x"}', 1).wait_for_publish()
        request = {"schema": 1, "ts": time.time(), "id": "audit-7", "command": "report_counts"}
        requester.publish(command_topic, json.dumps(request), 1).wait_for_publish()
        events = listener.wait_for(Kind.EVENTS, lambda found: "outbox_counts" in event_names(found))
    finally:
        requester.loop_stop()
        requester.disconnect()

    (answer,) = [e for e in events if e["event"] == "outbox_counts"]
    assert answer["data"] == {
        "request_id": "audit-7",
        "boot": 1,
        "seq": 4,
        "committed": 4,
        "dropped": 0,
        "depth": 0,
    }
    assert answer["seq"] == 5  # the answer is itself a numbered message


def test_what_the_broker_acknowledged_just_before_it_crashed_is_sent_again(
    make_client, listener, mosquitto, state_dir
):
    client = make_client(resend_acked_s=30)
    assert client.connected.wait(TIMEOUT_S)
    seqs = [client.event("acked", index=index) for index in range(5)]
    assert client.flush(TIMEOUT_S)
    listener.wait_for(Kind.EVENTS, lambda found: len(found) >= 5)
    mosquitto.kill()  # before it saved (a kill -9 saves nothing more)
    (mosquitto.folder / "mosquitto.db").unlink(missing_ok=True)  # as if it had never saved
    mosquitto.start()
    listener.wait_subscribed()

    events = listener.wait_for(Kind.EVENTS, lambda found: len(found) >= 10)

    assert seqs == [1, 2, 3, 4, 5]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5] * 2  # each once more after the crash
    assert client.resent >= 5
    assert outbox_depth(state_dir) == 0  # the copies are not waiting for anything


def test_an_event_larger_than_a_collector_accepts_is_refused_and_uses_no_seq(client, state_dir):
    before = client.event("small")

    with pytest.raises(TelemetryError, match=r"events message of \d+ bytes: a collector accepts"):
        client.event("big", blob="x" * 70_000)
    after = client.event("small")

    assert (before, after) == (1, 2)
