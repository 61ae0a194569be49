"""Tests for collector/ingest.py: raw MQTT messages to stored records, on every backend.

Parametrized over ``db_url`` (SQLite and PostgreSQL): the PostgreSQL backend passes the
same ingest tests as SQLite.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time

import pytest

from collector.errors import StorageError
from collector.ingest import Ingestor, RawMessage
from collector.storage import Storage
from edge_runtime.telemetry.protocol import MAX_PAYLOAD_BYTES, Kind, topic

FLEET = "plant-7"


@pytest.fixture
def storage(db_url):
    opened = Storage(db_url)
    yield opened
    opened.close()


@pytest.fixture
def ingestor(storage) -> Ingestor:
    return Ingestor(storage)


# -- realistic payloads, as a TelemetryClient sends them ----------------------------------
def status_payload(state: str, boot: int, ts: float, reason: str) -> dict:
    return {"schema": 1, "ts": ts, "state": state, "boot": boot, "reason": reason}


def birth_payload(boot: int, ts: float, version: str = "1.0.0") -> dict:
    return {
        "schema": 1,
        "ts": ts,
        "boot": boot,
        "runtime_version": "0.1.0",
        "device": {"arch": "aarch64", "cores": 4, "ram_mb": 3906.1, "os": "Debian 12"},
        "bundle": {
            "id": "sha256:0f1e",
            "name": "digits",
            "version": version,
            "profile": "raspberry-pi-4",
            "backend": "onnxruntime",
            "recipe": "int8-static",
        },
    }


def metrics_payload(boot: int, seq: int, ts: float, inferences: int = 100, errors: int = 0) -> dict:
    return {
        "schema": 1,
        "ts": ts,
        "boot": boot,
        "seq": seq,
        "interval_s": 10.0,
        "inferences": inferences,
        "errors": errors,
        "latency": {
            "count": inferences,
            "p50_ms": 4.0,
            "p95_ms": 9.5,
            "p99_ms": 11.0,
            "max_ms": 12.0,
            "mean_ms": 5.0,
            "buckets_ms": [1.0, 10.0],
            "counts": [0, inferences, 0],
        },
        "tokens_per_s": None,
        "process": {"cpu_percent": 31.5, "rss_mb": 88.0},
        "system": {
            "mem_total_mb": 3906.1,
            "mem_available_mb": 2100.0,
            "temperature_c": 51.2,
            "disk_free_mb": 9000.0,
            "uptime_s": 3600.0,
        },
        "outbox": {"depth": 0, "dropped": 2},
    }


def event_payload(boot: int, seq: int, ts: float, name: str = "selftest", **data) -> dict:
    return {"schema": 1, "ts": ts, "boot": boot, "seq": seq, "event": name, "data": data}


def raw(
    kind: Kind | str,
    payload: dict | bytes,
    device: str = "pi-1",
    received: float | None = None,
    retained: bool = False,
) -> RawMessage:
    name = topic(FLEET, device, kind) if isinstance(kind, Kind) else kind
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return RawMessage(name, body, time.time() if received is None else received, retained)


def good_messages(now: float) -> list[RawMessage]:
    return [
        raw(Kind.STATUS, status_payload("online", 1, now, "connected"), retained=True),
        raw(Kind.BIRTH, birth_payload(1, now), retained=True),
        raw(Kind.EVENTS, event_payload(1, 1, now, "bundle_loaded", signed_by="ab12")),
        raw(Kind.METRICS, metrics_payload(1, 2, now, inferences=40, errors=2)),
    ]


def with_field(payload: dict, path: str, value) -> bytes:
    *parents, last = path.split(".")
    target = payload
    for key in parents:
        target = target[key]
    target[last] = value
    return json.dumps(payload).encode()


def padded(payload: dict, size: int) -> bytes:
    """Valid JSON of exactly ``size`` bytes (trailing whitespace is allowed)."""
    return json.dumps(payload).encode().ljust(size, b" ")


def test_every_kind_is_stored_and_visible(ingestor, storage):
    now = time.time()

    ingestor.ingest(good_messages(now))
    device = storage.device("pi-1")
    (row,) = storage.metrics("pi-1")

    assert (device["fleet"], device["status"], device["boot"]) == (FLEET, "online", 1)
    assert device["facts"]["arch"] == "aarch64"
    assert (device["bundle_name"], device["bundle_version"]) == ("digits", "1.0.0")
    assert device["runtime_version"] == "0.1.0"
    assert device["inferences_recent"] == 40
    assert device["error_rate"] == pytest.approx(0.05)
    assert (device["messages"], device["missing_messages"]) == (2, 0)
    assert device["recent_events"][0]["event"] == "bundle_loaded"
    assert device["recent_events"][0]["data"] == {"signed_by": "ab12"}
    assert (row["boot"], row["seq"], row["inferences"], row["errors"]) == (1, 2, 40, 2)
    assert (row["p95_ms"], row["cpu_percent"], row["rss_mb"]) == (9.5, 31.5, 88.0)
    assert (row["temperature_c"], row["uptime_s"], row["outbox_dropped"]) == (51.2, 3600.0, 2)
    assert ingestor.stats.stored == 2
    assert (ingestor.stats.births, ingestor.stats.statuses) == (1, 1)
    assert ingestor.stats.received == 4
    assert ingestor.stats.rejected == {}


def test_duplicates_are_stored_once_and_counted(ingestor, storage):
    now = time.time()
    stream = [raw(Kind.METRICS, metrics_payload(1, seq, now + seq)) for seq in (1, 2, 3)]

    ingestor.ingest(stream)
    ingestor.ingest(stream[1:])  # a replayed outbox, or a QoS 1 redelivery
    ingestor.ingest([stream[0], stream[0]])  # twice in one batch

    assert storage.stream_keys("pi-1") == [(1, 1), (1, 2), (1, 3)]
    assert ingestor.stats.stored == 3
    assert ingestor.stats.duplicates == 4
    assert storage.device("pi-1")["inferences_recent"] == 300


def test_the_same_seq_in_a_new_boot_is_a_new_message(ingestor, storage):
    now = time.time()

    ingestor.ingest([raw(Kind.EVENTS, event_payload(boot, 1, now)) for boot in (1, 2)])

    assert storage.stream_keys("pi-1") == [(1, 1), (2, 1)]
    assert ingestor.stats.duplicates == 0


def test_a_late_will_from_an_older_boot_does_not_override_a_newer_online(ingestor, storage):
    now = time.time()
    ingestor.ingest([raw(Kind.STATUS, status_payload("online", 1, now - 60, "connected"))])
    ingestor.ingest([raw(Kind.STATUS, status_payload("online", 2, now, "connected"))])

    ingestor.ingest([raw(Kind.STATUS, status_payload("offline", 1, now - 60, "will"))])
    device = storage.device("pi-1")

    assert (device["status"], device["boot"], device["status_reason"]) == ("online", 2, "connected")


def test_a_will_from_the_current_boot_marks_the_device_offline(ingestor, storage):
    # The Will is registered before connecting, so its ts is older than the online status.
    registered = time.time() - 5
    ingestor.ingest([raw(Kind.STATUS, status_payload("online", 3, registered + 0.2, "connected"))])

    ingestor.ingest([raw(Kind.STATUS, status_payload("offline", 3, registered, "will"))])
    device = storage.device("pi-1")

    assert (device["status"], device["status_reason"]) == ("offline", "will")


def test_missing_messages_counts_lost_seqs(ingestor, storage):
    now = time.time()
    kept = [1, 2, 5, 6, 9]  # 3, 4, 7, 8 were lost

    ingestor.ingest(
        [
            raw(Kind.METRICS, metrics_payload(1, seq, now))
            if seq % 2
            else raw(Kind.EVENTS, event_payload(1, seq, now))
            for seq in kept
        ]
    )
    device = storage.device("pi-1")

    assert (device["messages"], device["missing_messages"]) == (5, 4)


def test_devices_are_kept_apart(ingestor, storage):
    now = time.time()

    ingestor.ingest(
        [
            raw(Kind.METRICS, metrics_payload(1, 1, now, inferences=5), device="pi-1"),
            raw(Kind.METRICS, metrics_payload(1, 1, now, inferences=7), device="pi-2"),
            raw(Kind.STATUS, status_payload("offline", 1, now, "shutdown"), device="pi-2"),
        ]
    )

    assert [d["device_id"] for d in storage.devices()] == ["pi-1", "pi-2"]
    assert storage.device("pi-1")["inferences_recent"] == 5
    assert storage.device("pi-2")["inferences_recent"] == 7
    assert storage.device("pi-2")["status"] == "offline"
    assert storage.device("pi-1")["status"] == "unknown"


def test_last_seen_is_when_the_stream_was_received(ingestor, storage):
    now = time.time()

    ingestor.ingest(
        [
            raw(Kind.METRICS, metrics_payload(1, 1, now - 500), received=now - 2),
            raw(Kind.EVENTS, event_payload(1, 2, now - 400), received=now - 1),
        ]
    )

    assert storage.device("pi-1")["last_seen"] == pytest.approx(now - 1)


BAD_MESSAGES = {
    "malformed_json": [
        raw(Kind.METRICS, b'{"schema": 1, "ts": '),
        raw(Kind.EVENTS, b"\xff\xfe\x00not utf-8"),
        raw(Kind.EVENTS, b""),
    ],
    "not_an_object": [  # counted as malformed JSON
        raw(Kind.METRICS, b"[1, 2, 3]"),
        raw(Kind.STATUS, b'"online"'),
        raw(Kind.BIRTH, b"42"),
        raw(Kind.EVENTS, b"null"),
    ],
    "unknown_schema": [
        raw(Kind.METRICS, with_field(metrics_payload(1, 1, 0.0), "schema", 2)),
        raw(Kind.EVENTS, with_field(event_payload(1, 1, 0.0), "schema", "1")),
        raw(Kind.STATUS, b'{"ts": 1.0, "state": "online", "boot": 1}'),
    ],
    "invalid_field": [
        raw(Kind.METRICS, with_field(metrics_payload(1, 1, 0.0), "inferences", "10")),
        raw(Kind.METRICS, with_field(metrics_payload(1, 1, 0.0), "latency.p95_ms", "9.5")),
        raw(Kind.METRICS, with_field(metrics_payload(1, 1, 0.0), "gpu_percent", 5.0)),
        raw(Kind.EVENTS, with_field(event_payload(1, 0, 0.0), "seq", 0)),
        raw(Kind.STATUS, with_field(status_payload("online", 1, 0.0, "x"), "state", "asleep")),
        raw(Kind.BIRTH, with_field(birth_payload(1, 0.0), "bundle.version", 2)),
    ],
    "oversized": [
        raw(Kind.EVENTS, padded(event_payload(1, 1, 0.0), MAX_PAYLOAD_BYTES + 1)),
        raw(Kind.EVENTS, json.dumps(event_payload(1, 1, 0.0, blob="x" * 70_000)).encode()),
        raw(Kind.STATUS, b"{" * (MAX_PAYLOAD_BYTES + 1)),  # size is checked before parsing
    ],
    "bad_topic": [
        raw("edgepack/v2/plant-7/pi-1/metrics", metrics_payload(1, 1, 0.0)),
        raw("edgepack/v1/plant-7/pi-1", metrics_payload(1, 1, 0.0)),
        raw("edgepack/v1/plant-7/pi-1/metrics/extra", metrics_payload(1, 1, 0.0)),
        raw("edgepack/v1/plant-7/pi-1/telemetry", metrics_payload(1, 1, 0.0)),
        raw("devices/pi-1/metrics", metrics_payload(1, 1, 0.0)),
    ],
}
REASONS = {"not_an_object": "malformed_json"}
CASES = [
    pytest.param(REASONS.get(group, group), message, id=f"{group}-{index}")
    for group, messages in BAD_MESSAGES.items()
    for index, message in enumerate(messages)
]


@pytest.fixture
def sqlite_storage(tmp_path):
    opened = Storage(f"sqlite:///{tmp_path / 'cases.db'}")
    yield opened
    opened.close()


# Parsing does not depend on the database: the cases run on SQLite only; the test after
# this one puts every case in one batch on both backends.
@pytest.mark.parametrize(("reason", "bad"), CASES)
def test_a_bad_message_is_counted_and_the_rest_of_the_batch_is_stored(sqlite_storage, reason, bad):
    storage, ingestor = sqlite_storage, Ingestor(sqlite_storage)
    now = time.time()
    good = good_messages(now)

    ingestor.ingest([good[0], good[1], bad, good[2], good[3]])

    assert ingestor.stats.rejected == {reason: 1}
    assert storage.stream_keys("pi-1") == [(1, 1), (1, 2)]
    assert storage.device("pi-1")["status"] == "online"
    assert ingestor.stats.received == 5
    assert ingestor.stats.stored == 2


def test_every_kind_of_bad_message_in_one_batch_is_counted_under_its_reason(ingestor, storage):
    now = time.time()
    bad = [message for messages in BAD_MESSAGES.values() for message in messages]

    ingestor.ingest(bad[::2] + good_messages(now) + bad[1::2])

    expected = {}
    for group, messages in BAD_MESSAGES.items():
        reason = REASONS.get(group, group)
        expected[reason] = expected.get(reason, 0) + len(messages)
    assert ingestor.stats.rejected == expected
    assert storage.stream_keys("pi-1") == [(1, 1), (1, 2)]
    assert storage.device("pi-1")["bundle_name"] == "digits"


def test_a_batch_of_only_bad_messages_stores_nothing(ingestor, storage):
    ingestor.ingest([message for messages in BAD_MESSAGES.values() for message in messages])

    assert storage.devices() == []
    assert ingestor.stats.stored == 0
    assert ingestor.stats.batches == 1


def test_a_payload_of_exactly_the_maximum_size_is_accepted(ingestor, storage):
    message = raw(Kind.EVENTS, padded(event_payload(1, 1, time.time()), MAX_PAYLOAD_BYTES))

    ingestor.ingest([message])

    assert storage.stream_keys("pi-1") == [(1, 1)]
    assert ingestor.stats.rejected == {}


def test_the_size_limit_is_configurable(storage):
    ingestor = Ingestor(storage, max_payload_bytes=200)
    small = raw(Kind.EVENTS, event_payload(1, 1, time.time()))
    large = raw(Kind.EVENTS, event_payload(1, 2, time.time(), note="y" * 200))

    ingestor.ingest([small, large])

    assert ingestor.stats.rejected == {"oversized": 1}
    assert storage.stream_keys("pi-1") == [(1, 1)]


@pytest.mark.parametrize(
    "ignored",
    [
        raw(Kind.CMD, b'{"do": "reboot"}'),
        raw(Kind.STATUS, b"", retained=True),  # a retained status being cleared
        raw(Kind.BIRTH, b"", retained=True),
    ],
    ids=["command", "cleared-status", "cleared-birth"],
)
def test_commands_and_cleared_retained_messages_are_ignored(ingestor, storage, ignored):
    ingestor.ingest([ignored])

    assert ingestor.stats.rejected == {}
    assert storage.devices() == []
    assert ingestor.stats.received == 1


def test_rejections_are_logged_at_most_once_a_second(ingestor, caplog):
    flood = [raw(Kind.METRICS, b"not json")] * 200

    with caplog.at_level(logging.WARNING, logger="collector.ingest"):
        ingestor.ingest(flood)

    assert ingestor.stats.rejected == {"malformed_json": 200}
    lines = [r for r in caplog.records if r.name == "collector.ingest"]
    assert len(lines) == 1
    assert "malformed_json" in lines[0].getMessage()


def test_counters_add_up_over_batches(ingestor):
    now = time.time()

    ingestor.ingest(good_messages(now))
    ingestor.ingest(good_messages(now) + [raw(Kind.EVENTS, b"{")])

    stats = ingestor.stats
    assert (stats.received, stats.stored, stats.duplicates) == (9, 2, 2)
    assert (stats.births, stats.statuses, stats.batches) == (2, 2, 2)
    assert stats.rejected == {"malformed_json": 1}


# -- hostile messages: each is quarantined raw, with its error, and ingest goes on ---------------
def raw_json(kind: Kind, payload: dict, path: str, token: str, device: str = "pi-1") -> RawMessage:
    """A message whose field at ``path`` is the raw JSON ``token`` (NaN, a huge number)."""
    text = with_field(payload, path, "@@").decode().replace('"@@"', token)
    return raw(kind, text.encode(), device=device)


HOSTILE = {
    "seq-2^64": (
        raw_json(Kind.METRICS, metrics_payload(1, 1, 1.0), "seq", str(2**64)),
        "invalid_field",
        "seq: Input should be less than or equal to 9223372036854775807",
    ),
    "boot-2^63": (
        raw_json(Kind.STATUS, status_payload("online", 1, 1.0, "x"), "boot", str(2**63)),
        "invalid_field",
        "boot: Input should be less than or equal to 9223372036854775807",
    ),
    "inferences-2^63": (
        raw_json(Kind.METRICS, metrics_payload(1, 1, 1.0), "inferences", str(2**63)),
        "invalid_field",
        "inferences: Input should be less than or equal to",
    ),
    "nan-token": (
        raw_json(Kind.METRICS, metrics_payload(1, 1, 1.0), "interval_s", "NaN"),
        "invalid_field",
        "interval_s: Input should be a finite number",
    ),
    "ts-infinity": (
        raw_json(Kind.EVENTS, event_payload(1, 1, 1.0), "ts", "Infinity"),
        "invalid_field",
        "ts: Input should be a finite number",
    ),
    "nan-in-data": (
        raw_json(Kind.EVENTS, event_payload(1, 1, 1.0), "data", '{"x": NaN}'),
        "invalid_field",
        "data: Value error, NaN and Infinity are not JSON numbers",
    ),
    "huge-int-in-data": (
        raw_json(Kind.EVENTS, event_payload(1, 1, 1.0), "data", '{"x": ' + "9" * 5000 + "}"),
        "malformed_json",
        "number out of range",
    ),
    "nul-in-event-name": (
        raw(Kind.EVENTS, with_field(event_payload(1, 1, 1.0), "event", "a\u0000b")),
        "invalid_field",
        "event: Value error, character U+0000 at 1 is a control",
    ),
    "device-id-20000-chars": (
        raw(Kind.EVENTS, event_payload(1, 1, 1.0), device="d" * 20_000),
        "bad_topic",
        "(20000 characters) is not a valid name: use 1-128 letters",
    ),
    "device-id-right-to-left-override": (
        raw(Kind.EVENTS, event_payload(1, 1, 1.0), device="pi-\u202e1"),
        "bad_topic",
        "device id 'pi-\\u202e1' is not a valid name",  # escaped: the log cannot be turned
    ),
    "device-id-with-newline": (
        raw(Kind.STATUS, status_payload("online", 1, 1.0, "x"), device="pi-1\n"),
        "bad_topic",
        "device id 'pi-1\\n' is not a valid name",
    ),
    "oversized-3MiB": (  # as the wire hands over a packet too large to hold: its start, its size
        RawMessage(topic(FLEET, "pi-1", Kind.EVENTS), b'{"schema": 1, "x": "', 1.0, False, 3 << 20),
        "oversized",
        f"{3 << 20} bytes > 65536 on edgepack/v1/{FLEET}/pi-1/events",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_message_is_quarantined_and_the_next_good_one_is_stored(storage, case):
    bad, reason, error = HOSTILE[case]
    ingestor = Ingestor(storage)

    ingestor.ingest([bad])
    ingestor.ingest([raw(Kind.EVENTS, event_payload(1, 1, time.time()))])
    (row,) = storage.quarantined()

    assert storage.stream_keys("pi-1") == [(1, 1)]
    assert row["reason"] == reason
    assert row["topic"] == (bad.topic if len(bad.topic) <= 1024 else bad.topic[:1024] + "…")
    assert error in row["error"]
    assert len(row["error"]) < 600
    assert row["payload"] == bad.payload[: 64 * 1024]
    assert row["size"] == (bad.size or len(bad.payload))
    assert row["received"] == pytest.approx(bad.received)
    assert ingestor.stats.rejected == {reason: 1}
    assert (ingestor.stats.quarantined, ingestor.stats.quarantine_failed) == (1, 0)


def test_the_quarantine_keeps_only_the_newest_rows(sqlite_storage, monkeypatch):
    from collector import storage as storage_module

    monkeypatch.setattr(storage_module, "QUARANTINE_MAX_ROWS", 5)
    ingestor = Ingestor(sqlite_storage)

    ingestor.ingest([raw(Kind.EVENTS, f"junk {n}".encode()) for n in range(12)])

    rows = sqlite_storage.quarantined()
    assert [row["payload"] for row in rows] == [f"junk {n}".encode() for n in range(11, 6, -1)]


# A row the database itself refuses (a trigger stands in for any constraint the protocol's
# schema does not know): the batch is split until the refused message is found.
REFUSING_TRIGGER = {
    "sqlite": [
        "CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.event = 'poison' "
        "BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END"
    ],
    "postgres": [
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.event = 'poison' THEN RAISE EXCEPTION 'refused by a trigger'; END IF; "
        "RETURN NEW; END $$",
        "CREATE TRIGGER refuse BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse()",
    ],
}


def install_refusing_trigger(storage: Storage) -> None:
    for statement in REFUSING_TRIGGER[storage.dialect]:
        storage._execute(statement)


def test_a_message_the_database_refuses_is_quarantined_and_the_rest_stored(storage):
    install_refusing_trigger(storage)
    ingestor = Ingestor(storage)
    now = time.time()
    messages = [raw(Kind.EVENTS, event_payload(1, seq, now, "tick")) for seq in range(1, 41)]
    messages[25] = raw(Kind.EVENTS, event_payload(1, 26, now, "poison"))
    messages.append(raw(Kind.METRICS, b"not json"))

    ingestor.ingest(messages)
    rows = storage.quarantined()

    assert storage.stream_keys("pi-1") == [(1, seq) for seq in range(1, 41) if seq != 26]
    assert sorted(row["reason"] for row in rows) == ["malformed_json", "storage_refused"]
    refused = next(row for row in rows if row["reason"] == "storage_refused")
    assert "refused by a trigger" in refused["error"]
    assert json.loads(refused["payload"])["seq"] == 26
    assert ingestor.stats.rejected == {"storage_refused": 1, "malformed_json": 1}
    assert (ingestor.stats.stored, ingestor.stats.quarantined) == (39, 2)
    assert ingestor.stats.batches == 1


def test_a_batch_waits_out_a_locked_database_and_nothing_is_quarantined(tmp_path):
    url = f"sqlite:///{tmp_path / 'locked.db'}"
    storage = Storage(url)
    ingestor = Ingestor(storage)
    prepared = ingestor.prepare([raw(Kind.EVENTS, event_payload(1, 1, time.time()))])
    other = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process holds the database: an outage

    with pytest.raises(StorageError, match="does not take writes: .*database is locked"):
        ingestor.commit(prepared)
    pending = len(prepared.pending)
    other.execute("ROLLBACK")
    ingestor.commit(prepared)

    assert pending == 1
    assert storage.stream_keys("pi-1") == [(1, 1)]
    assert storage.quarantined() == []
    assert (ingestor.stats.stored, ingestor.stats.quarantined) == (1, 0)
    other.close()
    storage.close()


def test_the_tail_a_device_reports_counts_as_missing(ingestor, storage):
    now = time.time()
    birth_2 = {**birth_payload(2, now), "previous_boot_last_seq": 7}  # boot 1 ended at 7
    birth_4 = {**birth_payload(4, now), "previous_boot_last_seq": 5}  # boot 3: nothing stored
    shutdown = {**status_payload("offline", 2, now, "shutdown"), "last_seq": 4}

    ingestor.ingest(
        [raw(Kind.METRICS, metrics_payload(1, seq, now)) for seq in (1, 2, 3)]
        + [raw(Kind.BIRTH, birth_2, retained=True), raw(Kind.EVENTS, event_payload(2, 1, now))]
        + [raw(Kind.STATUS, shutdown, retained=True), raw(Kind.BIRTH, birth_4, retained=True)]
    )
    before = storage.device("pi-1")
    ingestor.ingest([raw(Kind.BIRTH, birth_2, retained=True)])  # retained: resent on subscribe
    ingestor.ingest([raw(Kind.METRICS, metrics_payload(1, seq, now)) for seq in (4, 5, 6, 7)])
    after = storage.device("pi-1")

    # boot 1: 3 of 7; boot 2: 1 of 4; boot 3: 0 of 5
    assert (before["messages"], before["missing_messages"]) == (4, 4 + 3 + 5)
    assert (after["messages"], after["missing_messages"]) == (8, 3 + 5)


def test_a_tail_report_never_lowers_what_was_stored(ingestor, storage):
    now = time.time()
    late = {**birth_payload(2, now), "previous_boot_last_seq": 2}  # says 2, yet 5 arrived

    ingestor.ingest([raw(Kind.EVENTS, event_payload(1, 5, now)), raw(Kind.BIRTH, late)])

    assert storage.device("pi-1")["missing_messages"] == 4
