"""The collector's schema: an ordered, append-only list of named migrations.

Each migration is a function of the dialect (``sqlite`` or ``postgres``) returning its
statements; ``Storage.migrate`` applies the ones a database lacks, each in one transaction,
and records them in ``schema_migrations``. Never edit a migration that has shipped; add one.
"""

from __future__ import annotations

from collections.abc import Callable

# column -> where it sits in a metrics payload: (section or None, key).
METRIC_PATHS = {
    "interval_s": (None, "interval_s"),
    "inferences": (None, "inferences"),
    "errors": (None, "errors"),
    "p50_ms": ("latency", "p50_ms"),
    "p95_ms": ("latency", "p95_ms"),
    "p99_ms": ("latency", "p99_ms"),
    "max_ms": ("latency", "max_ms"),
    "mean_ms": ("latency", "mean_ms"),
    "tokens_per_s": (None, "tokens_per_s"),
    "cpu_percent": ("process", "cpu_percent"),
    "rss_mb": ("process", "rss_mb"),
    "mem_available_mb": ("system", "mem_available_mb"),
    "temperature_c": ("system", "temperature_c"),
    "disk_free_mb": ("system", "disk_free_mb"),
    "uptime_s": ("system", "uptime_s"),
    "outbox_depth": ("outbox", "depth"),
    "outbox_dropped": ("outbox", "dropped"),
}
METRIC_COLUMNS = tuple(METRIC_PATHS)
INTEGER_METRICS = ("inferences", "errors", "outbox_depth", "outbox_dropped")
REAL = "DOUBLE PRECISION"


def _serial(dialect: str) -> str:
    return "BIGSERIAL PRIMARY KEY" if dialect == "postgres" else "INTEGER PRIMARY KEY AUTOINCREMENT"


def _initial(dialect: str) -> list[str]:
    metric_columns = ",\n".join(
        f"{name} {'BIGINT' if name in INTEGER_METRICS else REAL}" for name in METRIC_COLUMNS
    )
    return [
        f"""CREATE TABLE devices (
            device_id TEXT PRIMARY KEY, fleet TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'unknown', status_reason TEXT, status_ts {REAL},
            boot BIGINT, last_seen {REAL}, runtime_version TEXT,
            bundle_id TEXT, bundle_name TEXT, bundle_version TEXT, profile TEXT, backend TEXT,
            recipe TEXT, facts TEXT)""",
        f"""CREATE TABLE metrics (
            device_id TEXT NOT NULL, boot BIGINT NOT NULL, seq BIGINT NOT NULL,
            ts {REAL} NOT NULL, received {REAL} NOT NULL,
            {metric_columns},
            payload TEXT NOT NULL,
            PRIMARY KEY (device_id, boot, seq))""",
        "CREATE INDEX metrics_device_ts ON metrics (device_id, ts)",
        f"""CREATE TABLE events (
            device_id TEXT NOT NULL, boot BIGINT NOT NULL, seq BIGINT NOT NULL,
            ts {REAL} NOT NULL, received {REAL} NOT NULL, event TEXT NOT NULL,
            level TEXT NOT NULL, data TEXT NOT NULL,
            PRIMARY KEY (device_id, boot, seq))""",
        f"""CREATE TABLE status_log (
            id {_serial(dialect)}, device_id TEXT NOT NULL, ts {REAL} NOT NULL,
            state TEXT NOT NULL, boot BIGINT, reason TEXT)""",
        f"""CREATE TABLE births (
            device_id TEXT NOT NULL, boot BIGINT NOT NULL, ts {REAL} NOT NULL,
            payload TEXT NOT NULL, PRIMARY KEY (device_id, boot))""",
    ]


def _quarantine_and_boot_ends(dialect: str) -> list[str]:
    """What ingest could not store, how each boot ended, and the collector's own history."""
    blob = "BYTEA" if dialect == "postgres" else "BLOB"
    return [
        # Raw (truncated) messages that failed validation or storage, with why.
        f"""CREATE TABLE quarantine (
            id {_serial(dialect)}, received {REAL} NOT NULL, topic TEXT NOT NULL,
            reason TEXT NOT NULL, error TEXT NOT NULL, size BIGINT NOT NULL,
            payload {blob} NOT NULL)""",
        # The last seq a boot committed, as the device reported it (next birth, clean stop):
        # the lost tail of a boot counts as missing.
        """CREATE TABLE boot_ends (
            device_id TEXT NOT NULL, boot BIGINT NOT NULL, last_seq BIGINT NOT NULL,
            PRIMARY KEY (device_id, boot))""",
        # When each collector (by MQTT client id) last held its broker session.
        f"""CREATE TABLE collector_sessions (
            client_id TEXT PRIMARY KEY, alive_ts {REAL} NOT NULL)""",
        # What the operator must see on the fleet page (a lost broker session).
        f"""CREATE TABLE collector_events (
            id {_serial(dialect)}, ts {REAL} NOT NULL, client_id TEXT NOT NULL,
            level TEXT NOT NULL, event TEXT NOT NULL, message TEXT NOT NULL)""",
    ]


MIGRATIONS: list[tuple[str, Callable[[str], list[str]]]] = [
    ("0001_initial", _initial),
    ("0002_quarantine_boot_ends", _quarantine_and_boot_ends),
]
