"""Telemetry storage on SQLite (default) or PostgreSQL (several collectors, one database).

Schema changes are an ordered list of named migrations, recorded in ``schema_migrations``
and applied on every open, for both databases alike. Duplicates are dropped by the primary
key (device, boot, seq) with ``ON CONFLICT DO NOTHING``, so two collectors sharing one
database, or a replayed outbox, never store a message twice.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from .errors import StorageError
from .migrations import METRIC_COLUMNS, METRIC_PATHS, MIGRATIONS

__all__ = ["METRIC_COLUMNS", "METRIC_PATHS", "MIGRATIONS", "Batch", "Storage", "metric_row"]
QUARANTINE_PAYLOAD_BYTES = 64 * 1024  # of each quarantined message, the rest is cut
QUARANTINE_MAX_ROWS = 10_000  # the newest are kept: a flood of junk cannot fill the disk
STREAM_KEY = ("device_id", "boot", "seq", "ts", "received")


def metric_row(device: str, model, received: float, text: str) -> tuple:
    """A full metrics row from a validated MetricsPayload, in METRIC_PATHS order.

    Spelled out rather than looped over METRIC_PATHS: this runs for every message, and
    the generic version cost a third of the collector's time per message.
    """
    latency, process, system, outbox = model.latency, model.process, model.system, model.outbox
    return (
        device,
        model.boot,
        model.seq,
        model.ts,
        received,
        model.interval_s,
        model.inferences,
        model.errors,
        latency.p50_ms,
        latency.p95_ms,
        latency.p99_ms,
        latency.max_ms,
        latency.mean_ms,
        model.tokens_per_s,
        process.get("cpu_percent"),
        process.get("rss_mb"),
        system.get("mem_available_mb"),
        system.get("temperature_c"),
        system.get("disk_free_mb"),
        system.get("uptime_s"),
        outbox.get("depth"),
        outbox.get("dropped"),
        text,
    )


DEVICE_COLUMNS = (
    "device_id",
    "fleet",
    "status",
    "status_reason",
    "status_ts",
    "boot",
    "last_seen",
    "runtime_version",
    "bundle_id",
    "bundle_name",
    "bundle_version",
    "profile",
    "backend",
    "recipe",
    "facts",
)


@dataclass(frozen=True)
class Batch:
    """Parsed messages to store in one transaction."""

    metrics: list[tuple] = ()  # (device_id, MetricsPayload, received, raw JSON text)
    events: list[tuple] = ()
    births: list[tuple] = ()
    statuses: list[tuple] = ()  # (device_id, fleet, ts, state, boot, reason, received)
    seen: dict[str, tuple[str, float]] | None = None  # device -> (fleet, last ts)
    boot_ends: list[tuple] = ()  # (device_id, boot, last seq committed by that boot)
    quarantine: list[tuple] = ()  # (received, topic, reason, error, size, payload)


_UPSERT_BOOT_END = (
    "INSERT INTO boot_ends (device_id, boot, last_seq) VALUES (?, ?, ?) "
    "ON CONFLICT (device_id, boot) DO UPDATE SET last_seq = CASE "
    "WHEN excluded.last_seq > boot_ends.last_seq THEN excluded.last_seq "
    "ELSE boot_ends.last_seq END"
)
# Sums of 64-bit columns are summed as floats: the largest valid values (seq 2^63-1 in two
# boots, inferences 2^62 twice) overflow an integer SUM on SQLite and would take every
# read of the fleet down with them.
_FLOAT_SUM = "SUM(CAST({} AS DOUBLE PRECISION))"


def _text(value: str, limit: int) -> str:
    """Any string made safe for a TEXT column (PostgreSQL refuses NUL) and cut to ``limit``."""
    value = value.replace("\x00", "\\x00")
    return value if len(value) <= limit else value[:limit] + "…"


class _Rollback(Exception):
    """Raised inside a transaction to undo it (a write probe)."""


# A device row exists once anything arrives; last_seen only moves forward.
_UPSERT_SEEN = (
    "INSERT INTO devices (device_id, fleet, last_seen) VALUES (?, ?, ?) "
    "ON CONFLICT (device_id) DO UPDATE SET fleet = excluded.fleet, last_seen = "
    "CASE WHEN excluded.last_seen IS NULL THEN devices.last_seen "
    "WHEN devices.last_seen IS NULL OR devices.last_seen < excluded.last_seen "
    "THEN excluded.last_seen ELSE devices.last_seen END"
)


def _guarded(method):
    """Serialize on the lock, reconnect if needed, and turn driver errors into StorageError."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            self._ensure_connection()
            try:
                return method(self, *args, **kwargs)
            except self._driver_errors as exc:
                raise StorageError(f"{self.dialect} error: {exc}") from exc

    return wrapper


class Storage:
    """One database connection, guarded by a lock (the ingest writer and the HTTP API share it)."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = urlparse(url)
        self._lock = threading.RLock()
        if parsed.scheme == "sqlite":
            import sqlite3

            path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else parsed.path
            if not path:
                raise StorageError(f"database URL {url!r} names no file: use sqlite:///fleet.db")
            try:
                self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            except sqlite3.Error as exc:
                raise StorageError(f"cannot open SQLite database {path}: {exc}") from None
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self.dialect = "sqlite"
            self._driver_errors = (sqlite3.Error,)
        elif parsed.scheme in ("postgresql", "postgres"):
            try:
                import psycopg
            except ImportError:
                raise StorageError(
                    "PostgreSQL needs psycopg: pip install 'edgepack[collector-postgres]'"
                ) from None
            self._connect_postgres = lambda: psycopg.connect(url, autocommit=True)
            try:
                self._db = self._connect_postgres()
            except psycopg.Error as exc:
                raise StorageError(f"cannot connect to {parsed.hostname}: {exc}") from None
            self.dialect = "postgres"
            self._driver_errors = (psycopg.Error,)
        else:
            raise StorageError(
                f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://HOST/DB"
            )
        self.migrate()

    # -- plumbing --------------------------------------------------------------------------
    def _ensure_connection(self) -> None:
        """PostgreSQL connections die (restarts, failovers): open a new one when needed."""
        if self.dialect != "postgres" or not (self._db.closed or self._db.broken):
            return
        try:
            self._db.close()
            self._db = self._connect_postgres()
        except self._driver_errors as exc:
            raise StorageError(f"PostgreSQL is unreachable: {exc}") from None

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self.dialect == "postgres" else statement

    def _execute(self, statement: str, params: Iterable = ()):
        return self._db.execute(self._sql(statement), tuple(params))

    def _transaction(self):
        if self.dialect == "postgres":
            return self._db.transaction()
        return _SqliteTransaction(self._db)

    def _executemany(self, statement: str, rows: list[tuple]) -> int:
        if not rows:
            return 0
        cursor = self._db.cursor()
        cursor.executemany(self._sql(statement), rows)
        return max(cursor.rowcount, 0)

    def _insert_new(self, table: str, columns: tuple[str, ...], rows: list[tuple]) -> int:
        """Insert rows, skipping (device, boot, seq) already stored; returns rows inserted."""
        if not rows:
            return 0
        names = ", ".join(columns)
        if self.dialect == "sqlite":
            marks = ", ".join("?" * len(columns))
            return self._executemany(
                f"INSERT INTO {table} ({names}) VALUES ({marks}) ON CONFLICT DO NOTHING", rows
            )
        return self._copy_new(table, columns, rows)

    def _copy_new(self, table: str, columns: tuple[str, ...], rows: list[tuple]) -> int:
        """PostgreSQL: COPY into a per-transaction staging table, then one INSERT ... SELECT.

        Several times faster than row-by-row inserts, even pipelined.
        """
        stage, names = f"{table}_stage", ", ".join(columns)
        self._db.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} "
            f"(LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        cursor = self._db.cursor()
        with cursor.copy(f"COPY {stage} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        cursor.execute(
            f"INSERT INTO {table} ({names}) SELECT {names} FROM {stage} ON CONFLICT DO NOTHING"
        )
        return max(cursor.rowcount, 0)

    def _insert_metrics(self, metrics: list[tuple]) -> int:
        """``metrics``: (device, MetricsPayload, received, raw JSON text) per message."""
        columns = (*STREAM_KEY, *METRIC_COLUMNS, "payload")
        return self._insert_new("metrics", columns, [metric_row(*m) for m in metrics])

    @_guarded
    def migrate(self) -> list[str]:
        """Apply the migrations this database lacks; return their names."""
        applied: list[str] = []
        with self._lock:
            self._execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at "
                "DOUBLE PRECISION NOT NULL)"
            )
            done = {row[0] for row in self._execute("SELECT name FROM schema_migrations")}
            for name, make in MIGRATIONS:
                if name in done:
                    continue
                with self._transaction():
                    for statement in make(self.dialect):
                        self._execute(statement)
                    self._execute(
                        "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                        (name, time.time()),
                    )
                applied.append(name)
        return applied

    @_guarded
    def applied_migrations(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._execute("SELECT name FROM schema_migrations ORDER BY name")]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writes ------------------------------------------------------------------------------
    @_guarded
    def store(self, batch: Batch) -> tuple[int, int]:
        """Store a batch in one transaction; returns (stored, duplicates) for metrics+events."""
        with self._lock, self._transaction():
            stored = self._insert_metrics(list(batch.metrics))
            stored += self._insert_new(
                "events", (*STREAM_KEY, "event", "level", "data"), list(batch.events)
            )
            for device_id, fleet, ts, payload, boot, facts in batch.births:
                # Not "seen": a retained birth can be hours old. Metrics set last_seen.
                self._upsert_seen(device_id, fleet, None)
                self._execute(
                    "INSERT INTO births (device_id, boot, ts, payload) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT DO NOTHING",
                    (device_id, boot, ts, payload),
                )
                bundle = facts.get("bundle") or {}
                self._execute(
                    "UPDATE devices SET runtime_version = ?, facts = ?, bundle_id = ?, "
                    "bundle_name = ?, bundle_version = ?, profile = ?, backend = ?, recipe = ? "
                    "WHERE device_id = ? AND (boot IS NULL OR boot <= ?)",
                    (
                        facts.get("runtime_version"),
                        json.dumps(facts.get("device")),
                        bundle.get("id"),
                        bundle.get("name"),
                        bundle.get("version"),
                        bundle.get("profile"),
                        bundle.get("backend"),
                        bundle.get("recipe"),
                        device_id,
                        boot,
                    ),
                )
            for device_id, fleet, ts, state, boot, reason, received in batch.statuses:
                self._upsert_seen(device_id, fleet, None)
                self._execute(
                    "INSERT INTO status_log (device_id, ts, state, boot, reason) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (device_id, ts, state, boot, reason),
                )
                # A status from an older boot (a late Will) never overrides a newer one.
                # Within a boot, arrival order decides: a Will carries the timestamp of the
                # connect it was registered with, so its own ``ts`` is always stale.
                self._execute(
                    "UPDATE devices SET status = ?, status_reason = ?, status_ts = ?, boot = ? "
                    "WHERE device_id = ? AND (boot IS NULL OR boot < ? OR "
                    "(boot = ? AND (status_ts IS NULL OR status_ts <= ?)))",
                    (state, reason, received, boot, device_id, boot, boot, received),
                )
            seen = [(device_id, fleet, ts) for device_id, (fleet, ts) in (batch.seen or {}).items()]
            self._executemany(_UPSERT_SEEN, seen)
            # Reporting again after the watchdog gave up on it: it is alive after all.
            self._executemany(
                "UPDATE devices SET status = 'online', status_reason = 'reporting again', "
                "status_ts = ? WHERE device_id = ? AND status = 'offline' "
                "AND status_reason = 'missed heartbeats'",
                [(ts, device_id) for device_id, _, ts in seen],
            )
            self._executemany(_UPSERT_BOOT_END, list(batch.boot_ends))
            self._insert_quarantine(batch.quarantine)
        total = len(batch.metrics) + len(batch.events)
        return stored, total - stored

    def _insert_quarantine(self, rows: Iterable[tuple]) -> None:
        rows = [
            (
                received,
                _text(topic, 1024),
                reason,
                _text(error, 2000),
                size,
                bytes(payload[:QUARANTINE_PAYLOAD_BYTES]),
            )
            for received, topic, reason, error, size, payload in rows
        ]
        if not rows:
            return
        self._executemany(
            "INSERT INTO quarantine (received, topic, reason, error, size, payload) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        self._execute(
            "DELETE FROM quarantine WHERE id <= (SELECT MAX(id) FROM quarantine) - ?",
            (QUARANTINE_MAX_ROWS,),
        )

    @_guarded
    def quarantine(self, rows: list[tuple]) -> None:
        """Store quarantine rows (received, topic, reason, error, size, payload) on their own."""
        with self._lock, self._transaction():
            self._insert_quarantine(rows)

    def writable(self) -> bool:
        """Whether a write succeeds now: tells a storage outage from a message it refuses.

        The probe rewrites ``schema_migrations`` in a transaction and rolls it back, so it
        takes the same locks and connection a batch would.
        """
        try:
            self._probe_write()
        except StorageError:
            return False
        return True

    @_guarded
    def _probe_write(self) -> None:
        with self._lock:
            try:
                with self._transaction():
                    self._execute("UPDATE schema_migrations SET applied_at = applied_at")
                    raise _Rollback
            except _Rollback:
                pass

    @_guarded
    def touch_session(self, client_id: str, now: float) -> float | None:
        """Record that ``client_id`` holds its broker session now; return the previous time."""
        with self._lock, self._transaction():
            row = self._execute(
                "SELECT alive_ts FROM collector_sessions WHERE client_id = ?", (client_id,)
            ).fetchone()
            self._execute(
                "INSERT INTO collector_sessions (client_id, alive_ts) VALUES (?, ?) "
                "ON CONFLICT (client_id) DO UPDATE SET alive_ts = excluded.alive_ts",
                (client_id, now),
            )
        return row[0] if row else None

    @_guarded
    def session_alive_ts(self, client_id: str) -> float | None:
        """When ``client_id`` last held its broker session (None: never)."""
        with self._lock:
            row = self._execute(
                "SELECT alive_ts FROM collector_sessions WHERE client_id = ?", (client_id,)
            ).fetchone()
        return row[0] if row else None

    @_guarded
    def add_collector_event(self, client_id: str, level: str, event: str, message: str) -> None:
        with self._lock, self._transaction():
            self._execute(
                "INSERT INTO collector_events (ts, client_id, level, event, message) "
                "VALUES (?, ?, ?, ?, ?)",
                (time.time(), client_id, level, event, _text(message, 2000)),
            )

    def _upsert_seen(self, device_id: str, fleet: str, ts: float | None) -> None:
        self._execute(_UPSERT_SEEN, (device_id, fleet, ts))

    @_guarded
    def mark_silent_offline(self, cutoff_ts: float) -> list[str]:
        """Devices marked online but not heard from since ``cutoff_ts`` become offline."""
        with self._lock, self._transaction():
            rows = self._execute(
                "SELECT device_id, boot FROM devices WHERE status = 'online' AND last_seen < ?",
                (cutoff_ts,),
            ).fetchall()
            now = time.time()
            for device_id, boot in rows:
                self._execute(
                    "UPDATE devices SET status = 'offline', status_reason = 'missed heartbeats', "
                    "status_ts = ? WHERE device_id = ?",
                    (now, device_id),
                )
                self._execute(
                    "INSERT INTO status_log (device_id, ts, state, boot, reason) "
                    "VALUES (?, ?, 'offline', ?, 'missed heartbeats')",
                    (device_id, now, boot),
                )
        return [row[0] for row in rows]

    # -- reads -------------------------------------------------------------------------------
    @_guarded
    def devices(self, window_s: float = 300.0) -> list[dict[str, Any]]:
        """Every device with its status, bundle, last seen, and recent p95 and error rate."""
        since = time.time() - window_s
        with self._lock:
            rows = self._execute(
                f"SELECT {', '.join(DEVICE_COLUMNS)} FROM devices ORDER BY device_id"
            ).fetchall()
            recent = {
                row[0]: row[1:]
                for row in self._execute(
                    f"SELECT device_id, MAX(p95_ms), {_FLOAT_SUM.format('inferences')}, "
                    f"{_FLOAT_SUM.format('errors')}, COUNT(*), MAX(outbox_dropped) FROM metrics "
                    "WHERE ts >= ? GROUP BY device_id",
                    (since,),
                ).fetchall()
            }
            streams = self._stream_counts()
        devices = []
        for row in rows:
            device = dict(zip(DEVICE_COLUMNS, row, strict=True))
            device["facts"] = json.loads(device["facts"]) if device["facts"] else None
            p95, inferences, errors, reports, dropped = recent.get(row[0], (None, 0, 0, 0, 0))
            received, missing = streams.get(row[0], (0, 0))
            device.update(
                p95_ms=p95,
                inferences_recent=int(inferences or 0),
                error_rate=(float(errors) / float(inferences)) if inferences else 0.0,
                reports_recent=int(reports or 0),
                outbox_dropped=int(dropped or 0),
                messages=received,
                missing_messages=missing,
            )
            devices.append(device)
        return devices

    def _stream_counts(self) -> dict[str, tuple[int, int]]:
        """Per device: (messages stored, messages missing), summed over its boots.

        A boot's messages are numbered 1..last with no gaps, where ``last`` is the higher of
        its highest stored seq and the last seq the device says the boot committed (its next
        birth, or its clean stop); every number not stored is missing. Summed in Python:
        exact, and no 64-bit overflow.
        """
        boots: dict[tuple[str, int], list[int]] = {}
        for device_id, boot, max_seq, count in self._execute(
            "SELECT device_id, boot, MAX(seq), COUNT(*) FROM ("
            " SELECT device_id, boot, seq FROM metrics UNION ALL"
            " SELECT device_id, boot, seq FROM events) AS stream GROUP BY device_id, boot"
        ).fetchall():
            boots[(device_id, int(boot))] = [int(max_seq), int(count)]
        for device_id, boot, last_seq in self._execute(
            "SELECT device_id, boot, last_seq FROM boot_ends"
        ).fetchall():
            entry = boots.setdefault((device_id, int(boot)), [0, 0])
            entry[0] = max(entry[0], int(last_seq))
        totals: dict[str, tuple[int, int]] = {}
        for (device_id, _), (last, count) in boots.items():
            received, missing = totals.get(device_id, (0, 0))
            totals[device_id] = (received + count, missing + last - count)
        return totals

    @_guarded
    def device(self, device_id: str) -> dict[str, Any] | None:
        matches = [d for d in self.devices() if d["device_id"] == device_id]
        if not matches:
            return None
        device = matches[0]
        with self._lock:
            device["recent_events"] = [
                {
                    "ts": ts,
                    "boot": boot,
                    "seq": seq,
                    "event": event,
                    "level": level,
                    "data": json.loads(data),
                }
                for ts, boot, seq, event, level, data in self._execute(
                    "SELECT ts, boot, seq, event, level, data FROM events WHERE device_id = ? "
                    "ORDER BY ts DESC LIMIT 20",
                    (device_id,),
                ).fetchall()
            ]
            device["status_history"] = [
                {"ts": ts, "state": state, "boot": boot, "reason": reason}
                for ts, state, boot, reason in self._execute(
                    "SELECT ts, state, boot, reason FROM status_log WHERE device_id = ? "
                    "ORDER BY id DESC LIMIT 20",
                    (device_id,),
                ).fetchall()
            ]
        return device

    @_guarded
    def metrics(
        self,
        device_id: str,
        since: float | None = None,
        until: float | None = None,
        limit: int = 5000,
    ) -> list[dict[str, Any]]:
        clauses, params = ["device_id = ?"], [device_id]
        if since is not None:
            clauses.append("ts >= ?")
            params.append(since)
        if until is not None:
            clauses.append("ts <= ?")
            params.append(until)
        columns = ("boot", "seq", "ts") + METRIC_COLUMNS
        with self._lock:
            rows = self._execute(
                f"SELECT {', '.join(columns)} FROM metrics WHERE {' AND '.join(clauses)} "
                f"ORDER BY ts LIMIT {int(limit)}",
                params,
            ).fetchall()
        return [dict(zip(columns, row, strict=True)) for row in rows]

    @_guarded
    def stream_keys(self, device_id: str) -> list[tuple[int, int]]:
        """Every stored (boot, seq) of a device's metrics and events, sorted (for tests/audits)."""
        with self._lock:
            rows = self._execute(
                "SELECT boot, seq FROM metrics WHERE device_id = ? UNION ALL "
                "SELECT boot, seq FROM events WHERE device_id = ?",
                (device_id, device_id),
            ).fetchall()
        return sorted((int(b), int(s)) for b, s in rows)

    @_guarded
    def metric_totals(self) -> dict[str, dict[str, Any]]:
        """Per device: stored reports, inferences and errors summed over them, latest report.

        Rows are never deleted, so the sums only grow: /metrics exposes them as counters.
        ``latest`` holds the newest report's boot, seq, ts and metric columns.
        """
        columns = ("boot", "seq", "ts") + METRIC_COLUMNS
        listed = ", ".join(columns)
        with self._lock:
            sums = self._execute(
                f"SELECT device_id, COUNT(*), {_FLOAT_SUM.format('inferences')}, "
                f"{_FLOAT_SUM.format('errors')} FROM metrics GROUP BY device_id"
            ).fetchall()
            latest = self._execute(
                f"SELECT device_id, {listed} FROM (SELECT device_id, {listed}, ROW_NUMBER() "
                "OVER (PARTITION BY device_id ORDER BY ts DESC, boot DESC, seq DESC) AS newest "
                "FROM metrics) AS ranked WHERE newest = 1"
            ).fetchall()
        newest = {row[0]: dict(zip(columns, row[1:], strict=True)) for row in latest}
        return {
            device_id: {
                "reports": int(reports),
                "inferences": int(inferences or 0),
                "errors": int(errors or 0),
                "latest": newest.get(device_id),
            }
            for device_id, reports, inferences, errors in sums
        }

    @_guarded
    def quarantined(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest quarantined messages, newest first, with their raw (cut) payload."""
        columns = ("id", "received", "topic", "reason", "error", "size", "payload")
        with self._lock:
            rows = self._execute(
                f"SELECT {', '.join(columns)} FROM quarantine ORDER BY id DESC LIMIT {int(limit)}"
            ).fetchall()
        return [{**dict(zip(columns, row, strict=True)), "payload": bytes(row[-1])} for row in rows]

    @_guarded
    def collector_events(self, limit: int = 20) -> list[dict[str, Any]]:
        """The collectors' own newest events (a lost broker session), newest first."""
        columns = ("ts", "client_id", "level", "event", "message")
        with self._lock:
            rows = self._execute(
                f"SELECT {', '.join(columns)} FROM collector_events "
                f"ORDER BY id DESC LIMIT {int(limit)}"
            ).fetchall()
        return [dict(zip(columns, row, strict=True)) for row in rows]


class _SqliteTransaction:
    def __init__(self, db) -> None:
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, *rest) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
