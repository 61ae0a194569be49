"""Tests for edge_runtime/telemetry/outbox.py (the crash-safe disk outbox)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from edge_runtime.telemetry import outbox as outbox_module
from edge_runtime.telemetry.outbox import Outbox

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def path(tmp_path) -> Path:
    return tmp_path / "state" / "outbox.db"


@pytest.fixture
def outbox(path):
    opened = Outbox(path)
    yield opened
    opened.close()


def payload(size: int = 0):
    """A ``make_payload`` that writes the seq, padded to ``size`` bytes."""

    def make(seq: int) -> bytes:
        return json.dumps({"seq": seq}).encode().ljust(size, b" ")

    return make


def seqs(messages) -> list[int]:
    return [json.loads(message.payload)["seq"] for message in messages]


class Clock:
    """A settable stand-in for the ``time`` module the outbox reads ``time()`` from."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def test_creates_the_state_folder(tmp_path):
    path = tmp_path / "a" / "b" / "outbox.db"

    Outbox(path).close()

    assert path.is_file()


def test_put_returns_contiguous_seqs_starting_at_one(outbox):
    outbox.next_boot()

    returned = [outbox.put("t", payload()) for _ in range(5)]

    assert returned == [1, 2, 3, 4, 5]
    assert seqs(outbox.after(0, 100)) == [1, 2, 3, 4, 5]


def test_after_returns_messages_of_every_topic_in_put_order(outbox):
    for topic in ["metrics", "events", "metrics", "events", "events"]:
        outbox.put(topic, payload())

    messages = outbox.after(0, 100)

    assert seqs(messages) == [1, 2, 3, 4, 5]
    assert [m.topic for m in messages] == ["metrics", "events", "metrics", "events", "events"]
    assert [m.id for m in messages] == sorted(m.id for m in messages)


@pytest.mark.parametrize(
    ("skip", "limit", "expected"), [(0, 2, [1, 2]), (2, 3, [3, 4, 5]), (5, 9, [6]), (6, 3, [])]
)
def test_after_pages_by_id_and_limit(outbox, skip, limit, expected):
    for _ in range(6):
        outbox.put("t", payload())
    ids = [m.id for m in outbox.after(0, 100)]
    last_id = ids[skip - 1] if skip else 0

    messages = outbox.after(last_id, limit)

    assert seqs(messages) == expected


def test_after_keeps_topic_and_payload_bytes(outbox):
    outbox.put("edgepack/v1/f/d/events", lambda seq: b"\x00\xffbinary")

    (message,) = outbox.after(0, 10)

    assert message.topic == "edgepack/v1/f/d/events"
    assert message.payload == b"\x00\xffbinary"
    assert isinstance(message.payload, bytes)


def test_ack_deletes_only_the_acknowledged_messages(outbox):
    for _ in range(5):
        outbox.put("t", payload())
    ids = [m.id for m in outbox.after(0, 100)]

    outbox.ack([ids[0], ids[2], ids[4]])

    assert seqs(outbox.after(0, 100)) == [2, 4]
    assert outbox.depth() == 2


def test_ack_of_unknown_or_no_ids_changes_nothing(outbox):
    outbox.put("t", payload())

    outbox.ack([])
    outbox.ack([12345])

    assert outbox.depth() == 1


def test_next_boot_increments_boot_and_restarts_seq(outbox):
    first_boot = outbox.next_boot()
    first = [outbox.put("t", payload()) for _ in range(3)]

    second_boot = outbox.next_boot()
    second = [outbox.put("t", payload()) for _ in range(2)]

    assert (first_boot, second_boot) == (1, 2)
    assert first == [1, 2, 3]
    assert second == [1, 2]


def test_counters_persist_across_instances(path):
    before = Outbox(path)
    before.next_boot()
    before.put("t", payload())
    before.put("t", payload())
    before.close()

    after = Outbox(path)
    continued = after.put("t", payload())
    boot = after.next_boot()
    restarted = after.put("t", payload())
    depth = after.depth()
    after.close()

    assert continued == 3  # same boot: seq continues where the last instance stopped
    assert boot == 2
    assert restarted == 1
    assert depth == 4  # unacknowledged messages survive the restart


def test_byte_bound_drops_the_oldest_and_counts_them(outbox):
    outbox.max_bytes = 250

    for _ in range(5):
        outbox.put("t", payload(100))

    assert seqs(outbox.after(0, 100)) == [4, 5]
    assert outbox.dropped == 3


def test_byte_bound_is_kept_after_acks(outbox):
    outbox.max_bytes = 250
    outbox.put("t", payload(100))
    outbox.put("t", payload(100))
    outbox.ack([m.id for m in outbox.after(0, 100)])

    outbox.put("t", payload(100))
    outbox.put("t", payload(100))

    assert seqs(outbox.after(0, 100)) == [3, 4]  # acked bytes were released, nothing dropped
    assert outbox.dropped == 0


def test_dropped_count_and_byte_total_persist_across_instances(path):
    before = Outbox(path, max_bytes=250)
    for _ in range(4):
        before.put("t", payload(100))
    before.close()

    after = Outbox(path, max_bytes=250)
    dropped_at_open = after.dropped
    after.put("t", payload(100))
    remaining = seqs(after.after(0, 100))
    dropped = after.dropped
    after.close()

    assert dropped_at_open == 2
    assert remaining == [4, 5]  # the reopened outbox knew its stored bytes
    assert dropped == 3


def test_age_bound_drops_expired_messages_on_the_next_put(outbox, monkeypatch):
    clock = Clock(1_000_000.0)
    monkeypatch.setattr(outbox_module, "time", types.SimpleNamespace(time=clock.time))
    outbox.max_age_s = 60
    outbox.put("t", payload())
    clock.now += 30
    outbox.put("t", payload())

    clock.now += 45  # the first is now 75 s old, the second 45 s
    outbox.put("t", payload())

    assert seqs(outbox.after(0, 100)) == [2, 3]
    assert outbox.dropped == 1


def test_a_failing_make_payload_stores_nothing_and_consumes_no_seq(outbox):
    outbox.next_boot()
    outbox.put("t", payload())

    def broken(seq: int) -> bytes:
        raise ValueError("cannot serialize")

    with pytest.raises(ValueError, match="cannot serialize"):
        outbox.put("t", broken)
    following = outbox.put("t", payload())

    assert following == 2
    assert seqs(outbox.after(0, 100)) == [1, 2]
    assert outbox.depth() == 2


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from edge_runtime.telemetry.outbox import Outbox

    outbox = Outbox(sys.argv[1])
    outbox.next_boot()
    for _ in range(int(sys.argv[2])):
        outbox.put("t", lambda seq: str(seq).encode())
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("count", [1, 57])
def test_messages_put_before_a_sigkill_are_all_there(path, count):
    process = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(count)], cwd=REPO, capture_output=True
    )

    outbox = Outbox(path)
    stored = [int(message.payload) for message in outbox.after(0, 10_000)]
    boot = outbox.next_boot()
    outbox.close()

    assert process.returncode == -9, process.stderr.decode()
    assert stored == list(range(1, count + 1))
    assert boot == 2


def test_acknowledged_messages_are_kept_only_for_the_resend_window(tmp_path):
    outbox = Outbox(tmp_path / "outbox.db", keep_acked_s=0.5)
    outbox.put("t", lambda seq: b"one")
    outbox.ack([m.id for m in outbox.after(0, 10)])
    kept = [m.payload for m in outbox.acknowledged()]
    time.sleep(1.1)
    outbox.put("t", lambda seq: b"two")
    outbox.ack([m.id for m in outbox.after(0, 10)])  # an acknowledgement purges the old ones

    assert kept == [b"one"]
    assert [m.payload for m in outbox.acknowledged()] == [b"two"]
    assert (outbox.depth(), outbox.after(0, 10)) == (0, [])
    outbox.close()


def test_an_outbox_made_before_acknowledged_messages_were_kept_is_upgraded(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
        "payload BLOB NOT NULL, created REAL NOT NULL);"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
        "INSERT INTO outbox (topic, payload, created) VALUES ('t', x'7b7d', 1e12);"
    )
    old.commit()
    old.close()

    outbox = Outbox(path)
    waiting = outbox.after(0, 10)
    outbox.ack([m.id for m in waiting])

    assert [m.payload for m in waiting] == [b"{}"]
    assert [m.payload for m in outbox.acknowledged()] == [b"{}"]
    assert outbox.depth() == 0
    outbox.close()
