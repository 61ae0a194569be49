"""The disk outbox: every metrics or events message is stored before it is published.

A message leaves the queue only when the broker's PUBACK for it arrives, so a broker
outage, a lost connection or a killed process loses nothing: the next connection (or the
next process) replays the outbox in order. It is bounded by total bytes and by age; what
it has to drop (oldest first) is counted, persistently, and reported in ``metrics``.

An acknowledged message is kept ``keep_acked_s`` longer (outside the bounds) and sent again
after the next (re)connect: a broker saves its state after it acknowledges, so a broker that
crashes in between has lost what it acknowledged last. The collector drops the duplicates.

SQLite in WAL mode with synchronous=NORMAL: an enqueue survives a process crash
(SIGKILL); only an OS crash or power loss can lose the last transactions.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    acked REAL  -- when the broker acknowledged it; NULL while it waits
);
CREATE INDEX IF NOT EXISTS outbox_created ON outbox (created);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_ACKED_INDEX = "CREATE INDEX IF NOT EXISTS outbox_acked ON outbox (acked) WHERE acked IS NOT NULL"
_BUMP_COMMITTED = (
    "INSERT INTO meta(key, value) VALUES('committed', 1) "
    "ON CONFLICT(key) DO UPDATE SET value = value + 1"
)


@dataclass(frozen=True)
class OutboxMessage:
    id: int
    topic: str
    payload: bytes


class Outbox:
    """A bounded, ordered, crash-safe queue of MQTT messages on disk. Thread-safe."""

    def __init__(
        self,
        path: Path,
        max_bytes: int = 64 * 2**20,
        max_age_s: float = 7 * 86400,
        keep_acked_s: float = 10.0,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.keep_acked_s = keep_acked_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
        if "acked" not in columns:  # an outbox made before acknowledged messages were kept
            self._db.execute("ALTER TABLE outbox ADD COLUMN acked REAL")
        self._db.execute(_ACKED_INDEX)
        self._last_purge = 0.0
        # Size and depth (of what waits) are kept in memory (COUNT(*) scans the table).
        row = self._db.execute(
            "SELECT COALESCE(SUM(LENGTH(payload)), 0), COUNT(*) FROM outbox WHERE acked IS NULL"
        ).fetchone()
        self._bytes, self._depth = int(row[0]), int(row[1])
        self.previous_last_seq: int | None = None

    # -- counters kept in the same database, so they survive restarts -------------------
    def _get(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _add(self, key: str, amount: int) -> int:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
            (key, amount),
        )
        return self._get(key)

    def next_boot(self) -> int:
        """Increment and return the boot counter and restart ``seq`` (once per process start).

        The seq the previous boot reached is kept in ``previous_last_seq`` (None on a first
        boot): the device reports it, so a collector counts a lost tail as missing.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            boot = self._add("boot", 1)
            self.previous_last_seq = self._get("seq") if boot > 1 else None
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('seq', 0)")
            self._db.execute("COMMIT")
            return boot

    def counts(self) -> dict[str, int]:
        """The device's own record: boot, last seq, messages committed and dropped, depth.

        ``committed`` counts every message put since the state dir was made (or since this
        counter was added to it); ``dropped`` those the bounds or the broker threw away.
        """
        with self._lock:
            return {
                "boot": self._get("boot"),
                "seq": self._get("seq"),
                "committed": self._get("committed"),
                "dropped": self._get("dropped"),
                "depth": self._depth,
            }

    def last_seq(self) -> int:
        """The last seq this boot committed."""
        with self._lock:
            return self._get("seq")

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._get("dropped")

    # -- the queue -----------------------------------------------------------------------
    def put(self, topic: str, make_payload: Callable[[int], bytes]) -> int:
        """Store the next message of the stream; returns its ``seq``.

        ``make_payload(seq)`` builds the bytes. The seq counter and the message commit in one
        transaction, so the stored seqs have no gaps even if the process dies at any point:
        a collector can treat every missing seq as a lost message.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._add("seq", 1)
                self._db.execute(_BUMP_COMMITTED)
                payload = make_payload(seq)
                self._db.execute(
                    "INSERT INTO outbox(topic, payload, created) VALUES (?, ?, ?)",
                    (topic, payload, time.time()),
                )
                self._bytes += len(payload)
                self._depth += 1
                self._enforce_bounds()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return seq

    def _enforce_bounds(self) -> None:
        dropped = 0
        cutoff = time.time() - self.max_age_s
        cursor = self._db.execute(
            "DELETE FROM outbox WHERE created < ? RETURNING LENGTH(payload), acked", (cutoff,)
        )
        for size, acked in cursor.fetchall():  # the index on created makes this a range scan
            if acked is None:
                self._bytes -= size
                dropped += 1
        while self._bytes > self.max_bytes:
            row = self._db.execute(
                "DELETE FROM outbox WHERE id = (SELECT MIN(id) FROM outbox WHERE acked IS NULL) "
                "RETURNING LENGTH(payload)"
            ).fetchone()
            if row is None:
                break
            self._bytes -= row[0]
            dropped += 1
        if dropped:
            self._depth -= dropped
            self._add("dropped", dropped)

    def after(self, last_id: int, limit: int) -> list[OutboxMessage]:
        """Up to ``limit`` waiting messages with id > ``last_id``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload FROM outbox WHERE id > ? AND acked IS NULL "
                "ORDER BY id LIMIT ?",
                (last_id, limit),
            ).fetchall()
        return [OutboxMessage(row[0], row[1], bytes(row[2])) for row in rows]

    def acknowledged(self) -> list[OutboxMessage]:
        """The messages acknowledged within ``keep_acked_s`` of the last acknowledgement.

        Send them again after a (re)connect: the broker may have crashed before saving them.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload FROM outbox WHERE acked IS NOT NULL ORDER BY id"
            ).fetchall()
        return [OutboxMessage(row[0], row[1], bytes(row[2])) for row in rows]

    def ack(self, ids: list[int], dropped: bool = False) -> None:
        """Settle delivered messages (their PUBACK arrived); ``dropped`` deletes them as lost.

        Delivered messages are kept ``keep_acked_s`` more, then deleted, here: only while
        acknowledgements arrive, so what a broker acknowledged just before it crashed is
        still there to send again when it is back, however long it is away.
        """
        if not ids:
            return
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            for start in range(0, len(ids), 500):  # well under SQLite's variable limit
                chunk = ids[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                statement = (
                    f"DELETE FROM outbox WHERE id IN ({marks}) AND acked IS NULL "
                    "RETURNING LENGTH(payload)"
                    if dropped or self.keep_acked_s <= 0
                    else f"UPDATE outbox SET acked = {now!r} WHERE id IN ({marks}) "
                    "AND acked IS NULL RETURNING LENGTH(payload)"
                )
                for (size,) in self._db.execute(statement, chunk).fetchall():
                    self._bytes -= size
                    self._depth -= 1
            if dropped:
                self._add("dropped", len(ids))
            if now - self._last_purge >= 1.0:
                self._last_purge = now
                self._db.execute("DELETE FROM outbox WHERE acked < ?", (now - self.keep_acked_s,))
            self._db.execute("COMMIT")

    def depth(self) -> int:
        """Messages waiting for their PUBACK (never a count from halfway through an ack)."""
        with self._lock:
            return self._depth

    def close(self) -> None:
        with self._lock:
            self._db.close()
