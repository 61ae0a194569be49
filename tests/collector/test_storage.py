"""Tests for collector/storage.py, on SQLite and PostgreSQL alike (the ``db_url`` fixture)."""

from __future__ import annotations

import json
import time

import psycopg
import pytest

from collector import storage as storage_module
from collector.errors import StorageError
from collector.storage import METRIC_COLUMNS, METRIC_PATHS, Batch, Storage
from edge_runtime.telemetry.protocol import MetricsPayload

FLEET = "plant-7"
SHIPPED = ["0001_initial", "0002_quarantine_boot_ends"]
FACTS = {"arch": "aarch64", "cores": 4, "ram_mb": 3906.0}
BUNDLE = {
    "id": "sha256:abc",
    "name": "digits",
    "version": "1.2.0",
    "profile": "raspberry-pi-4",
    "backend": "onnxruntime",
    "recipe": "int8-static",
}


@pytest.fixture
def storage(db_url):
    opened = Storage(db_url)
    yield opened
    opened.close()


def metric(device: str, boot: int, seq: int, ts: float, **figures) -> tuple:
    """A metrics entry as ``Ingestor`` hands it over; unnamed optional figures are null."""
    body = {
        "schema": 1,
        "ts": ts,
        "boot": boot,
        "seq": seq,
        "interval_s": 10.0,
        "inferences": 0,
        "errors": 0,
        "tokens_per_s": None,
        "latency": {
            "count": 0,
            "p50_ms": None,
            "p95_ms": None,
            "p99_ms": None,
            "max_ms": None,
            "mean_ms": None,
            "buckets_ms": [],
            "counts": [0],
        },
        "process": {},
        "system": {},
        "outbox": {"depth": 0, "dropped": 0},
    }
    for name, value in figures.items():
        section, key = METRIC_PATHS[name]
        (body[section] if section else body)[key] = value
    text = json.dumps(body)
    return (device, MetricsPayload.model_validate_json(text), ts + 0.01, text)


def event(device: str, boot: int, seq: int, ts: float, name: str = "tick", **data) -> tuple:
    return (device, boot, seq, ts, ts + 0.01, name, "info", json.dumps(data))


def status(
    device: str,
    state: str,
    boot: int,
    ts: float,
    reason: str | None = None,
    received: float | None = None,
) -> tuple:
    return (device, FLEET, ts, state, boot, reason, ts if received is None else received)


def birth(device: str, boot: int, ts: float, bundle: dict | None = BUNDLE) -> tuple:
    facts = {"runtime_version": "0.1.0", "device": FACTS, "bundle": bundle}
    return (device, FLEET, ts, json.dumps({"boot": boot, **facts}), boot, facts)


def stream(*rows: tuple, metrics: bool = True) -> Batch:
    """Metrics (or events) rows, with the devices' last-seen times as ingest computes them."""
    seen = {}
    for row in rows:
        ts = row[1].ts if metrics else row[3]  # metrics entries carry the parsed payload
        seen[row[0]] = (FLEET, max(ts, seen.get(row[0], (FLEET, 0.0))[1]))
    return Batch(metrics=list(rows), seen=seen) if metrics else Batch(events=list(rows), seen=seen)


def test_migrations_are_applied_and_recorded(storage):
    assert storage.applied_migrations() == [name for name, _ in storage_module.MIGRATIONS]
    assert storage.migrate() == []


def test_a_second_open_applies_nothing(db_url):
    first = Storage(db_url)
    first.store(stream(metric("pi-1", 1, 1, time.time(), inferences=3)))
    first.close()

    second = Storage(db_url)  # re-running 0001_initial would fail: its tables exist
    applied, rows = second.migrate(), second.metrics("pi-1")
    names = second.applied_migrations()
    second.close()

    assert applied == []
    assert names == SHIPPED
    assert [row["inferences"] for row in rows] == [3]


def test_a_new_migration_is_applied_once_on_the_next_open(db_url, monkeypatch):
    Storage(db_url).close()
    monkeypatch.setattr(
        storage_module,
        "MIGRATIONS",
        [
            *storage_module.MIGRATIONS,
            ("9002_probe", lambda dialect: ["CREATE TABLE probe (x INT)"]),
        ],
    )

    upgraded = Storage(db_url)
    again = Storage(db_url)
    names = again.applied_migrations()
    upgraded.close()
    again.close()

    assert names == [*SHIPPED, "9002_probe"]


def test_a_failing_migration_leaves_nothing_behind(db_url, monkeypatch):
    Storage(db_url).close()
    shipped = list(storage_module.MIGRATIONS)
    broken = ["CREATE TABLE half (x INT)", "CREATE TABLE devices (x INT)"]  # exists: fails
    monkeypatch.setattr(
        storage_module,
        "MIGRATIONS",
        [*storage_module.MIGRATIONS, ("9002_broken", lambda d: broken)],
    )
    with pytest.raises(StorageError, match="devices"):
        Storage(db_url)
    monkeypatch.setattr(
        storage_module,
        "MIGRATIONS",
        [*shipped, ("9002_fixed", lambda d: ["CREATE TABLE half (x INT)"])],
    )

    fixed = Storage(db_url)  # would fail if the broken migration had left "half" behind
    names = fixed.applied_migrations()
    fixed.close()

    assert names == [*SHIPPED, "9002_fixed"]


@pytest.mark.parametrize(
    ("url", "phrase"),
    [
        ("mysql://127.0.0.1/fleet", "unsupported database URL"),
        ("fleet.db", "unsupported database URL"),
        ("sqlite:///", "names no file"),
        ("sqlite:////nonexistent-dir/sub/fleet.db", "cannot open SQLite database"),
        ("postgresql://127.0.0.1:1/fleet?connect_timeout=2", "cannot connect to 127.0.0.1"),
    ],
)
def test_a_bad_database_url_raises_storage_error(url, phrase):
    with pytest.raises(StorageError, match=phrase):
        Storage(url)


def test_metrics_events_status_and_birth_are_visible(storage):
    now = time.time()
    storage.store(
        Batch(
            births=[birth("pi-1", 1, now - 5)],
            statuses=[status("pi-1", "online", 1, now - 5, "connected")],
        )
    )
    storage.store(
        stream(
            metric("pi-1", 1, 1, now - 2, inferences=10, errors=1, p95_ms=8.0, outbox_dropped=0),
            metric("pi-1", 1, 3, now - 1, inferences=30, errors=2, p95_ms=12.5, outbox_dropped=4),
        )
    )
    storage.store(stream(event("pi-1", 1, 2, now - 1.5, "selftest", passed=True), metrics=False))

    (listed,) = storage.devices()
    device = storage.device("pi-1")

    assert listed["device_id"] == "pi-1"
    assert listed["fleet"] == FLEET
    assert (listed["status"], listed["status_reason"], listed["boot"]) == ("online", "connected", 1)
    assert listed["last_seen"] == pytest.approx(now - 1)
    assert listed["runtime_version"] == "0.1.0"
    assert listed["facts"] == FACTS
    assert (listed["bundle_name"], listed["bundle_version"]) == ("digits", "1.2.0")
    assert (listed["profile"], listed["backend"], listed["recipe"]) == (
        "raspberry-pi-4",
        "onnxruntime",
        "int8-static",
    )
    assert listed["p95_ms"] == 12.5
    assert listed["inferences_recent"] == 40
    assert listed["error_rate"] == pytest.approx(3 / 40)
    assert type(listed["error_rate"]) is float  # not PostgreSQL's Decimal
    assert listed["reports_recent"] == 2
    assert listed["outbox_dropped"] == 4
    assert (listed["messages"], listed["missing_messages"]) == (3, 0)
    assert [e["event"] for e in device["recent_events"]] == ["selftest"]
    assert device["recent_events"][0]["data"] == {"passed": True}
    assert device["status_history"] == [
        {"ts": pytest.approx(now - 5), "state": "online", "boot": 1, "reason": "connected"}
    ]


def test_device_reports_are_plain_json_on_every_backend(storage):
    now = time.time()
    storage.store(
        Batch(births=[birth("pi-1", 1, now)], statuses=[status("pi-1", "online", 1, now)])
    )
    storage.store(stream(metric("pi-1", 1, 1, now, inferences=7, errors=1, p95_ms=3.5)))
    storage.store(stream(event("pi-1", 1, 2, now, "selftest", passed=True), metrics=False))

    document = {
        "devices": storage.devices(),
        "device": storage.device("pi-1"),
        "metrics": storage.metrics("pi-1"),
    }

    assert json.loads(json.dumps(document)) == document


def test_an_unknown_device_is_none(storage):
    assert storage.device("nobody") is None
    assert storage.devices() == []


def test_recent_figures_ignore_reports_outside_the_window(storage):
    now = time.time()
    storage.store(
        stream(
            metric("pi-1", 1, 1, now - 3600, inferences=1000, errors=1000, p95_ms=900.0),
            metric("pi-1", 1, 2, now - 10, inferences=50, errors=0, p95_ms=5.0),
        )
    )

    (device,) = storage.devices(window_s=300)

    assert (device["inferences_recent"], device["error_rate"], device["p95_ms"]) == (50, 0.0, 5.0)
    assert device["reports_recent"] == 1


def test_metrics_between_since_and_until(storage):
    base = 1_700_000_000.0
    rows = [metric("pi-1", 1, seq, base + seq * 10, inferences=seq) for seq in range(1, 7)]
    storage.store(stream(*reversed(rows)))
    storage.store(stream(metric("pi-2", 1, 1, base + 30, inferences=99)))

    everything = storage.metrics("pi-1")
    middle = storage.metrics("pi-1", since=base + 20, until=base + 40)
    recent = storage.metrics("pi-1", since=base + 45)
    first_two = storage.metrics("pi-1", limit=2)

    assert [row["seq"] for row in everything] == [1, 2, 3, 4, 5, 6]  # ordered by ts
    assert [row["seq"] for row in middle] == [2, 3, 4]
    assert [row["seq"] for row in recent] == [5, 6]
    assert [row["seq"] for row in first_two] == [1, 2]
    assert everything[0]["boot"] == 1
    assert everything[2]["ts"] == pytest.approx(base + 30)
    assert set(everything[0]) == {"boot", "seq", "ts", *METRIC_COLUMNS}


def test_duplicates_are_stored_once_and_counted(storage):
    now = time.time()
    batch = stream(metric("pi-1", 1, 1, now), metric("pi-1", 1, 2, now))
    events = stream(event("pi-1", 1, 3, now), metrics=False)

    first = storage.store(batch)
    replay = storage.store(batch)
    mixed = storage.store(
        Batch(
            metrics=[metric("pi-1", 1, 2, now), metric("pi-1", 2, 1, now)],
            events=list(events.events) * 2,
        )
    )

    assert first == (2, 0)
    assert replay == (0, 2)
    assert mixed == (2, 2)  # (boot 2, seq 1) and the first copy of the event are new
    assert storage.stream_keys("pi-1") == [(1, 1), (1, 2), (1, 3), (2, 1)]


def test_the_same_seq_on_another_device_is_not_a_duplicate(storage):
    now = time.time()

    stored = storage.store(stream(metric("pi-1", 1, 1, now), metric("pi-2", 1, 1, now)))

    assert stored == (2, 0)


@pytest.mark.parametrize("one_batch", [True, False])
def test_a_late_will_from_an_older_boot_does_not_override_a_newer_online(storage, one_batch):
    now = time.time()
    online = status("pi-1", "online", 2, now - 1, "connected")
    late_will = status("pi-1", "offline", 1, now - 60, "will", received=now)  # arrives last

    if one_batch:
        storage.store(Batch(statuses=[online, late_will]))
    else:
        storage.store(Batch(statuses=[online]))
        storage.store(Batch(statuses=[late_will]))
    device = storage.device("pi-1")

    assert (device["status"], device["boot"], device["status_reason"]) == ("online", 2, "connected")
    assert [entry["boot"] for entry in device["status_history"]] == [1, 2]  # both logged


@pytest.mark.parametrize(
    ("second", "expected"),
    [
        (status("pi-1", "offline", 1, 2000.0, "shutdown"), ("offline", "shutdown")),
        # A Will carries the timestamp of the connect it was registered with: stale, but
        # it arrived later, so it wins within its boot.
        (status("pi-1", "offline", 1, 900.0, "will", received=1100.0), ("offline", "will")),
        (status("pi-1", "online", 2, 500.0, "connected", received=1100.0), ("online", "connected")),
        # Stored out of arrival order (e.g. by another collector): the later arrival stays.
        (status("pi-1", "offline", 1, 900.0, "will", received=999.0), ("online", "connected")),
    ],
)
def test_status_within_a_boot_follows_arrival_order(storage, second, expected):
    storage.store(Batch(statuses=[status("pi-1", "online", 1, 1000.0, "connected")]))

    storage.store(Batch(statuses=[second]))
    device = storage.device("pi-1")

    assert (device["status"], device["status_reason"]) == expected


def test_a_birth_from_an_older_boot_does_not_replace_the_bundle(storage):
    now = time.time()
    storage.store(
        Batch(statuses=[status("pi-1", "online", 2, now)], births=[birth("pi-1", 2, now)])
    )

    storage.store(Batch(births=[birth("pi-1", 1, now - 100, bundle={**BUNDLE, "version": "0.9"})]))
    device = storage.device("pi-1")

    assert device["bundle_version"] == "1.2.0"


def test_a_birth_without_a_bundle_clears_it(storage):
    now = time.time()
    storage.store(Batch(births=[birth("pi-1", 1, now)]))

    storage.store(Batch(births=[birth("pi-1", 2, now + 1, bundle=None)]))
    device = storage.device("pi-1")

    assert device["bundle_id"] is None
    assert device["facts"] == FACTS


def test_last_seen_never_goes_back(storage):
    now = time.time()
    storage.store(stream(metric("pi-1", 1, 2, now)))

    storage.store(stream(metric("pi-1", 1, 1, now - 100)))  # a replayed, older message
    storage.store(Batch(statuses=[status("pi-1", "online", 1, now + 50)]))

    assert storage.device("pi-1")["last_seen"] == pytest.approx(now)


def test_mark_silent_offline_marks_only_silent_online_devices(storage):
    now = time.time()
    storage.store(
        Batch(
            statuses=[
                status("silent", "online", 1, now - 100),
                status("talking", "online", 1, now - 100),
                status("gone", "offline", 1, now - 100, "shutdown"),
            ]
        )
    )
    storage.store(
        stream(
            metric("silent", 1, 1, now - 90),
            metric("talking", 1, 1, now - 1),
            metric("gone", 1, 1, now - 90),
        )
    )

    marked = storage.mark_silent_offline(now - 30)
    again = storage.mark_silent_offline(now - 30)
    silent = storage.device("silent")

    assert marked == ["silent"]
    assert again == []
    assert (silent["status"], silent["status_reason"]) == ("offline", "missed heartbeats")
    assert silent["status_history"][0]["reason"] == "missed heartbeats"
    assert silent["status_history"][0]["boot"] == 1
    assert storage.device("talking")["status"] == "online"
    assert storage.device("gone")["status_reason"] == "shutdown"


def test_a_new_boot_brings_a_silent_device_back_online(storage):
    now = time.time()
    storage.store(Batch(statuses=[status("pi-1", "online", 1, now - 100)]))
    storage.store(stream(metric("pi-1", 1, 1, now - 100)))
    storage.mark_silent_offline(now - 30)

    storage.store(Batch(statuses=[status("pi-1", "online", 2, now)]))

    assert storage.device("pi-1")["status"] == "online"


@pytest.mark.parametrize(
    ("keys", "messages", "missing"),
    [
        ([(1, 1), (1, 2), (1, 3)], 3, 0),
        ([(1, 1), (1, 2), (1, 4), (1, 7)], 4, 3),
        ([(1, 2), (1, 3)], 2, 1),  # seq 1 lost too
        ([(1, 1), (1, 3), (2, 1), (2, 2), (2, 5)], 5, 3),  # gaps counted per boot
    ],
)
def test_missing_messages_counts_gaps_in_seq(storage, keys, messages, missing):
    now = time.time()
    metrics = [metric("pi-1", b, s, now) for b, s in keys if s % 2]
    events = [event("pi-1", b, s, now) for b, s in keys if not s % 2]
    storage.store(Batch(metrics=metrics, events=events, seen={"pi-1": (FLEET, now)}))

    device = storage.device("pi-1")

    assert (device["messages"], device["missing_messages"]) == (messages, missing)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # a PostgreSQL matter
def test_a_lost_postgres_connection_is_reopened(db_url):
    storage = Storage(db_url)
    pid = storage._db.info.backend_pid
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    with pytest.raises(StorageError):  # the first call finds the connection dead
        storage.store(stream(metric("pi-1", 1, 1, time.time(), inferences=1)))
    stored, _ = storage.store(stream(metric("pi-1", 1, 1, time.time(), inferences=1)))

    assert stored == 1
    assert storage._db.info.backend_pid != pid
    storage.close()


def test_a_device_the_watchdog_gave_up_on_comes_back_when_it_reports(storage):
    now = time.time()
    storage.store(Batch(statuses=[status("pi-1", "online", 1, now - 100)]))
    storage.store(stream(metric("pi-1", 1, 1, now - 100)))
    assert storage.mark_silent_offline(now - 50) == ["pi-1"]

    storage.store(stream(metric("pi-1", 1, 2, now)))

    device = storage.device("pi-1")
    assert (device["status"], device["status_reason"]) == ("online", "reporting again")


def test_a_retained_birth_does_not_count_as_hearing_from_the_device(storage):
    storage.store(Batch(births=[birth("pi-1", 1, time.time() - 3600)]))

    assert storage.device("pi-1")["last_seen"] is None


def test_metric_row_follows_metric_paths():
    figures = {name: float(index + 1) for index, name in enumerate(METRIC_COLUMNS)}
    for name in ("inferences", "errors", "outbox_depth", "outbox_dropped"):
        figures[name] = int(figures[name])
    device, model, received, text = metric("pi-1", 1, 7, 1000.0, **figures)

    row = storage_module.metric_row(device, model, received, text)

    assert row[:5] == ("pi-1", 1, 7, 1000.0, 1000.01)
    assert row[5:-1] == tuple(figures[name] for name in METRIC_COLUMNS)
    assert row[-1] == text
