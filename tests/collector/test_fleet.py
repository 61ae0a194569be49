"""End to end: real agent processes, a real Mosquitto, the collector, SQLite and PostgreSQL.

These are the protocol's promises: nothing lost across a broker outage or a killed
device, the Will reports a dead device, shared subscriptions split the load, and junk on
the fleet's topics never stops ingest.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from collector.service import Collector
from collector.settings import CollectorSettings
from collector.storage import Storage
from edge_runtime.telemetry.protocol import MAX_PAYLOAD_BYTES
from tests.brokers import Mosquitto

FLEET = "testfleet"


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def start_agent(
    bundle: Path,
    pubkey: Path,
    broker: str,
    device: str,
    state_dir: Path,
    interval_s: float = 0.02,
    keepalive_s: int = 15,
) -> subprocess.Popen:
    """A real ``edge-runtime agent`` process; metrics every ``interval_s`` (0.02 = 50/s)."""
    env = {**os.environ, "EDGE_RUNTIME_KEEPALIVE_S": str(keepalive_s)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_runtime.cli",
            "agent",
            str(bundle),
            "--pubkey",
            str(pubkey),
            "--broker",
            broker,
            "--fleet",
            FLEET,
            "--device-id",
            device,
            "--state-dir",
            str(state_dir),
            "--metrics-interval-s",
            str(interval_s),
            "--demo-load",
            "20",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop_agent(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)  # the agent prints every thread's stack
        time.sleep(1)
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"the agent did not stop on SIGTERM:\n{output[-6000:]}") from None
    return output


def device_counters(state_dir: Path) -> dict[str, int]:
    """The device's own record: boot, last seq of this boot, and outbox depth."""
    with sqlite3.connect(state_dir / "outbox.db") as db:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        meta["depth"] = db.execute("SELECT COUNT(*) FROM outbox WHERE acked IS NULL").fetchone()[0]
    return meta


def start_collector(broker_url: str, db_url: str, client_id: str, **options) -> Collector:
    settings = CollectorSettings(
        broker=broker_url, db=db_url, client_id=client_id, heartbeat_timeout_s=600, **options
    )
    collector = Collector(settings, Storage(db_url)).start()
    wait_until(collector.subscribed.is_set, 10, "the collector to subscribe")
    return collector


def stop_collector(collector: Collector) -> None:
    collector.stop()
    collector.storage.close()


def wait_for_keys(storage: Storage, device: str, want: list[tuple[int, int]], broker=None) -> None:
    """Wait until the collector holds exactly ``want``; on timeout, say what differs."""
    try:
        wait_until(lambda: storage.stream_keys(device) == want, 30, f"{len(want)} messages")
    except AssertionError:
        have = storage.stream_keys(device)
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        raise AssertionError(
            f"collector has {len(have)} of {len(want)}: missing {missing[:20]} "
            f"({len(missing)}), unexpected {extra[:20]} ({len(extra)})"
            + (f"\nbroker log:\n{broker.log()[-3000:]}" if broker else "")
        ) from None


def expected_keys(last_seq_by_boot: dict[int, int]) -> list[tuple[int, int]]:
    return [
        (boot, seq) for boot, last in sorted(last_seq_by_boot.items()) for seq in range(1, last + 1)
    ]


def test_broker_outage_of_20s_loses_and_duplicates_nothing(
    mosquitto, db_url, cnn_bundle, keypair, tmp_path
):
    state = tmp_path / "device"
    collector = start_collector(mosquitto.url, db_url, "collector-a")
    agent = start_agent(cnn_bundle, keypair[1], mosquitto.url, "dev-a", state)
    try:
        wait_until(
            lambda: len(collector.storage.stream_keys("dev-a")) >= 100,
            30,
            "100 messages before the outage",
        )

        mosquitto.stop()
        time.sleep(20)
        during = device_counters(state)["depth"]
        mosquitto.start()

        wait_until(lambda: device_counters(state)["depth"] < 50, 60, "the outbox to drain")
    finally:
        output = stop_agent(agent)
    final = device_counters(state)
    want = expected_keys({final["boot"]: final["seq"]})
    wait_for_keys(collector.storage, "dev-a", want, mosquitto)
    stats = collector.ingestor.stats
    stop_collector(collector)

    assert during >= 800, f"only {during} messages queued during 20 s at 50/s: {output}"
    assert final["depth"] == 0
    assert len(want) >= during + 100  # the 100 before the outage, then the backlog
    # Every seq once (the primary key would hide a duplicate, so count what arrived too).
    assert stats.stored == len(want)
    assert stats.rejected == {}


def test_sigkill_while_the_broker_is_down_then_restart_loses_nothing(
    mosquitto, cnn_bundle, keypair, tmp_path
):
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    state = tmp_path / "device"
    collector = start_collector(mosquitto.url, db_url, "collector-b")
    first = start_agent(cnn_bundle, keypair[1], mosquitto.url, "dev-b", state)
    wait_until(lambda: len(collector.storage.stream_keys("dev-b")) >= 20, 30, "first messages")

    mosquitto.stop()
    wait_until(lambda: device_counters(state)["depth"] >= 100, 30, "an offline backlog")
    first.kill()  # SIGKILL: no flush, no goodbye
    first.wait(timeout=10)
    killed = device_counters(state)
    second = start_agent(cnn_bundle, keypair[1], mosquitto.url, "dev-b", state)
    wait_until(
        lambda: device_counters(state)["boot"] == killed["boot"] + 1, 30, "the restarted agent"
    )
    time.sleep(2)
    mosquitto.start()
    wait_until(lambda: device_counters(state)["depth"] < 50, 60, "the replay")
    stop_agent(second)
    final = device_counters(state)
    want = expected_keys({killed["boot"]: killed["seq"], final["boot"]: final["seq"]})
    wait_for_keys(collector.storage, "dev-b", want, mosquitto)
    stop_collector(collector)

    assert killed["depth"] >= 100
    assert final["depth"] == 0


def _status(storage: Storage, device: str):
    found = storage.device(device)
    return (found["status"], found["status_reason"], found["boot"]) if found else None


def test_will_marks_a_killed_device_offline_and_it_returns_online(
    mosquitto, cnn_bundle, keypair, tmp_path
):
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    state = tmp_path / "device"
    collector = start_collector(mosquitto.url, db_url, "collector-c")
    agent = start_agent(
        cnn_bundle, keypair[1], mosquitto.url, "dev-c", state, interval_s=1.0, keepalive_s=5
    )
    try:
        wait_until(
            lambda: (_status(collector.storage, "dev-c") or ("",))[0] == "online", 30, "online"
        )
        agent.kill()
        agent.wait(timeout=10)
        # The broker notices the dead connection after 1.5 x keep-alive and sends the Will.
        offline = wait_until(
            lambda: (s := _status(collector.storage, "dev-c")) and s[0] == "offline" and s,
            20,
            "the Will",
        )
        agent = start_agent(
            cnn_bundle, keypair[1], mosquitto.url, "dev-c", state, interval_s=1.0, keepalive_s=5
        )
        online = wait_until(
            lambda: (s := _status(collector.storage, "dev-c")) and s[0] == "online" and s,
            30,
            "online again",
        )
    finally:
        stop_agent(agent)
    stop_collector(collector)

    assert offline[1] == "will"
    assert online[2] == offline[2] + 1  # a new boot


def test_two_collectors_in_a_shared_group_store_each_message_once(
    mosquitto, cnn_bundle, keypair, tmp_path
):
    urls = [f"sqlite:///{tmp_path / f'fleet-{n}.db'}" for n in (1, 2)]
    collectors = [
        start_collector(mosquitto.url, url, f"collector-e{n}", shared_group="fleet-writers")
        for n, url in enumerate(urls)
    ]
    state = tmp_path / "device"
    agent = start_agent(cnn_bundle, keypair[1], mosquitto.url, "dev-e", state)
    wait_until(
        lambda: sum(len(c.storage.stream_keys("dev-e")) for c in collectors) >= 300,
        30,
        "300 messages",
    )
    stop_agent(agent)
    final = device_counters(state)
    want = expected_keys({final["boot"]: final["seq"]})
    wait_until(
        lambda: sorted(k for c in collectors for k in c.storage.stream_keys("dev-e")) == want,
        30,
        "every message in one of the collectors",
    )
    shares = [set(c.storage.stream_keys("dev-e")) for c in collectors]
    for collector in collectors:
        stop_collector(collector)

    assert not shares[0] & shares[1]
    assert all(len(share) > 0.2 * len(want) for share in shares), [len(s) for s in shares]


@pytest.fixture
def open_broker(tmp_path):
    """A broker without the shipped message_size_limit: the collector's own limit must hold."""
    broker = Mosquitto(tmp_path / "open-broker", extra_config="message_size_limit 0\n").start()
    yield broker
    broker.stop()


def test_junk_on_fleet_topics_is_counted_and_ingest_goes_on(open_broker, tmp_path):
    mosquitto = open_broker
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    collector = start_collector(mosquitto.url, db_url, "collector-f")
    publisher = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, "junk-publisher", protocol=mqtt.MQTTv5
    )
    publisher.connect("127.0.0.1", mosquitto.port)
    publisher.loop_start()

    def event(seq: int, **changes) -> bytes:
        body = {
            "schema": 1,
            "ts": time.time(),
            "boot": 1,
            "seq": seq,
            "event": "probe",
            "level": "info",
            "data": {},
        }
        body.update(changes)
        return json.dumps(body).encode()

    topic = f"edgepack/v1/{FLEET}/dev-f/events"
    junk = {
        "malformed_json": b"{not json",
        "unknown_schema": event(90, schema=99),
        "invalid_field": event(91, boot="one"),
        "oversized": event(92, data={"blob": "x" * (MAX_PAYLOAD_BYTES + 10)}),
    }
    for seq in (1, 2):
        publisher.publish(topic, event(seq), qos=1).wait_for_publish(5)
    for payload in junk.values():
        publisher.publish(topic, payload, qos=1).wait_for_publish(5)
    for seq in (3, 4):
        publisher.publish(topic, event(seq), qos=1).wait_for_publish(5)

    wait_until(
        lambda: collector.storage.stream_keys("dev-f") == [(1, s) for s in (1, 2, 3, 4)],
        20,
        "the good messages",
    )
    stats = collector.ingestor.stats
    still_connected = collector.connected.is_set()
    publisher.loop_stop()
    stop_collector(collector)

    assert dict(stats.rejected) == {reason: 1 for reason in junk}
    assert still_connected


def probe_publisher(port: int, client_id: str = "probe-publisher") -> mqtt.Client:
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id, protocol=mqtt.MQTTv5)
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    return publisher


def probe_event(seq: int, event: str = "probe", **changes) -> bytes:
    body = {"schema": 1, "ts": time.time(), "boot": 1, "seq": seq, "event": event, "data": {}}
    body.update(changes)
    return json.dumps(body).encode()


def test_hostile_messages_are_quarantined_and_the_next_good_one_is_stored_within_seconds(
    open_broker, tmp_path
):
    from tests.collector.test_ingest import install_refusing_trigger

    mosquitto = open_broker

    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    collector = start_collector(mosquitto.url, db_url, "collector-h")
    install_refusing_trigger(collector.storage)  # events named "poison" are refused
    publisher = probe_publisher(mosquitto.port)
    good = f"edgepack/v1/{FLEET}/dev-h/events"
    hostile = {
        "oversized": (good, b'{"schema": 1, "data": "' + b"x" * (3 << 20) + b'"}'),
        "seq-2^64": (good, probe_event(90).replace(b'"seq": 90', f'"seq": {2**64}'.encode())),
        "boot-2^63": (
            f"edgepack/v1/{FLEET}/dev-h/status",
            f'{{"schema": 1, "ts": 1.0, "state": "online", "boot": {2**63}}}'.encode(),
        ),
        "nan": (good, probe_event(91).replace(b'"ts": ', b'"ts": NaN, "x": ')),
        "long-device-id": (f"edgepack/v1/{FLEET}/{'d' * 20_000}/events", probe_event(92)),
        "bidi-device-id": (f"edgepack/v1/{FLEET}/dev\u202eh/events", probe_event(93)),
        "poison": (good, probe_event(94, event="poison")),
    }
    waited = {}
    try:
        for seq, (name, (topic, payload)) in enumerate(hostile.items(), start=1):
            publisher.publish(topic, payload, qos=1).wait_for_publish(10)
            publisher.publish(good, probe_event(seq), qos=1).wait_for_publish(10)
            started = time.monotonic()
            wait_until(
                lambda seq=seq: (1, seq) in collector.storage.stream_keys("dev-h"),
                10,
                f"the good message after {name}",
            )
            waited[name] = time.monotonic() - started
        rows = collector.storage.quarantined()
        stats = collector.ingestor.stats
        connected, reconnects = collector.connected.is_set(), collector.reconnects
    finally:
        publisher.loop_stop()
        stop_collector(collector)

    assert sorted(row["reason"] for row in rows) == sorted(
        ["oversized", "invalid_field", "invalid_field", "invalid_field", "bad_topic",
         "bad_topic", "storage_refused"]
    )  # fmt: skip
    oversized = next(row for row in rows if row["reason"] == "oversized")
    assert oversized["size"] == len(hostile["oversized"][1])
    assert oversized["payload"] == hostile["oversized"][1][: len(oversized["payload"])]
    assert stats.quarantined == len(hostile)
    assert max(waited.values()) < 5, waited
    assert (connected, reconnects) == (True, 0)  # the 3 MiB packet dropped no connection


def test_a_database_outage_holds_the_acknowledgements_and_loses_nothing(
    mosquitto, tmp_path, caplog
):
    from tests.brokers import PrivatePostgres

    postgres = PrivatePostgres().start()
    publisher = probe_publisher(mosquitto.port)
    topic = f"edgepack/v1/{FLEET}/dev-o/events"
    try:
        collector = start_collector(mosquitto.url, postgres.url, "collector-o")
        for seq in range(1, 21):
            publisher.publish(topic, probe_event(seq), qos=1).wait_for_publish(10)
        wait_until(lambda: len(collector.storage.stream_keys("dev-o")) == 20, 20, "20 stored")

        postgres.stop()  # an outage: not any message's fault
        for seq in range(21, 61):
            publisher.publish(topic, probe_event(seq), qos=1).wait_for_publish(10)
        with caplog.at_level(logging.WARNING, logger="collector.service"):
            wait_until(lambda: "does not take writes" in caplog.text, 20, "the outage")
        during = collector.ingestor.stats
        quarantined, failed = during.quarantined, during.quarantine_failed
        # Stopped mid-outage: what it held was never acknowledged, so the broker keeps it.
        stop_collector(collector)
        postgres.start()
        collector = start_collector(mosquitto.url, postgres.url, "collector-o")
        wait_for_keys(collector.storage, "dev-o", [(1, seq) for seq in range(1, 61)], mosquitto)
        rows = collector.storage.quarantined()
        stop_collector(collector)
    finally:
        publisher.loop_stop()
        postgres.remove()

    assert (quarantined, failed) == (0, 0)
    assert rows == []


def forget_broker_state(broker) -> None:
    """Restart the broker without its saved state, as a crash before any autosave leaves it."""
    broker.stop()
    (broker.folder / "mosquitto.db").unlink()
    broker.start()


def test_a_broker_that_forgot_the_collectors_session_is_warned_about(mosquitto, tmp_path, caplog):
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    caplog.set_level(logging.INFO, logger="collector.service")
    collector = start_collector(mosquitto.url, db_url, "collector-s")
    mosquitto.stop()
    mosquitto.start()  # state saved and restored: the session lives on
    wait_until(lambda: collector.reconnects == 1 and collector.subscribed.is_set(), 20, "back")
    kept = collector.sessions_lost

    forget_broker_state(mosquitto)
    wait_until(lambda: collector.sessions_lost == 1, 20, "the lost session to be noticed")
    stop_collector(collector)
    forget_broker_state(mosquitto)  # and again while no collector runs: the database knows
    restarted = start_collector(mosquitto.url, db_url, "collector-s")
    restarted_lost = restarted.sessions_lost
    events = restarted.storage.collector_events()
    stop_collector(restarted)

    assert kept == 0
    assert restarted_lost == 1
    assert [e["event"] for e in events] == ["session_lost", "session_lost"]
    assert "collector-s a new session" in events[0]["message"]
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "new session" in r.message
    ]
    assert len(warnings) == 2
    assert "collector/mosquitto.conf" in warnings[0].message


def test_a_session_that_expired_while_the_collector_was_away_is_no_alarm(mosquitto, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    collector = start_collector(mosquitto.url, db_url, "collector-x", session_expiry_s=1)
    stop_collector(collector)
    time.sleep(2.5)  # longer than the session expiry: the broker rightly let it go

    again = start_collector(mosquitto.url, db_url, "collector-x", session_expiry_s=1)
    lost = again.sessions_lost
    stop_collector(again)

    assert lost == 0


def test_the_shipped_broker_config_turns_an_oversized_publish_away_at_the_door(mosquitto, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    collector = start_collector(mosquitto.url, db_url, "collector-z")
    attacker = probe_publisher(mosquitto.port, "attacker")
    disconnected = threading.Event()
    attacker.on_disconnect = lambda *args: disconnected.set()
    device = probe_publisher(mosquitto.port, "dev-z")
    topic = f"edgepack/v1/{FLEET}/dev-z/events"
    try:
        attacker.publish(topic, b"x" * (MAX_PAYLOAD_BYTES + 1), qos=1)
        refused = disconnected.wait(10)
        attacker.loop_stop()  # it would only send it again
        for seq in (1, 2):
            device.publish(topic, probe_event(seq), qos=1).wait_for_publish(10)
        wait_until(lambda: collector.storage.stream_keys("dev-z") == [(1, 1), (1, 2)], 10, "both")
        rows = collector.storage.quarantined()
    finally:
        device.loop_stop()
        stop_collector(collector)

    assert refused  # Mosquitto drops the connection of a client over message_size_limit
    assert rows == []  # it never reached the collector
