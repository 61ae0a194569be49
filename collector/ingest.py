"""Turning raw MQTT messages into stored records: validate, count, never crash.

Anything malformed (not JSON, an unknown schema version, a wrong-typed field, an oversized
payload, a topic outside the protocol) is counted by reason and logged (rate-limited), and
ingest carries on with the next message.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from dataclasses import dataclass, field

from pydantic import ValidationError

from edge_runtime.telemetry.protocol import (
    MAX_PAYLOAD_BYTES,
    PAYLOAD_MODELS,
    SCHEMA_VERSION,
    Kind,
    parse_topic,
)

from .storage import Batch, Storage

log = logging.getLogger(__name__)


@dataclass
class IngestStats:
    """Counters since start (exposed on /metrics)."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    statuses: int = 0
    births: int = 0
    rejected: collections.Counter = field(default_factory=collections.Counter)
    batches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass(frozen=True)
class RawMessage:
    topic: str
    payload: bytes
    received: float
    retained: bool = False


@dataclass(frozen=True)
class Prepared:
    """A parsed batch waiting to be stored, with what parsing counted."""

    batch: Batch
    received: int
    rejected: collections.Counter


class Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _classify(topic: str, exc: Exception) -> Rejected:
    """Name why a payload failed: not JSON, an unknown schema version, or a bad field."""
    if isinstance(exc, UnicodeDecodeError):
        return Rejected("malformed_json", f"{topic}: not UTF-8: {exc}")
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return Rejected("malformed_json", f"{topic}: {first['msg']}")
    if not first["loc"]:
        return Rejected("malformed_json", f"{topic}: payload is not a JSON object")
    if first["loc"][0] == "schema":
        return Rejected(
            "unknown_schema",
            f"{topic}: schema {first.get('input')!r} is not supported "
            f"(this collector reads schema {SCHEMA_VERSION})",
        )
    where = ".".join(str(part) for part in first["loc"])
    return Rejected("invalid_field", f"{topic}: {where}: {first['msg']}")


class Ingestor:
    """Parses batches of raw messages and stores them through ``Storage``."""

    def __init__(self, storage: Storage, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        self.storage = storage
        self.max_payload_bytes = max_payload_bytes
        self.stats = IngestStats()
        self._last_log = 0.0

    def parse(self, message: RawMessage):
        """Return ``(kind, fleet, device, model, text)``; raise Rejected with a reason."""
        place = parse_topic(message.topic)
        if place is None:
            raise Rejected("bad_topic", f"topic {message.topic!r} is not an edgepack topic")
        fleet, device, kind = place
        if kind is Kind.CMD:
            return None  # commands go to devices; collectors only listen
        if len(message.payload) > self.max_payload_bytes:
            raise Rejected(
                "oversized",
                f"{len(message.payload)} bytes > {self.max_payload_bytes} on {message.topic}",
            )
        if not message.payload and message.retained:
            return None  # a cleared retained message
        try:
            # pydantic-core parses and validates in one pass: the fast path for good messages.
            model = PAYLOAD_MODELS[kind].model_validate_json(message.payload)
            text = message.payload.decode("utf-8")
        except (ValidationError, UnicodeDecodeError) as exc:
            raise _classify(message.topic, exc) from None
        return kind, fleet, device, model, text

    def ingest(self, messages: list[RawMessage]) -> Batch:
        """Parse and store ``messages`` in one transaction; count everything."""
        prepared = self.prepare(messages)
        self.commit(prepared)
        return prepared.batch

    def prepare(self, messages: list[RawMessage]) -> Prepared:
        """Parse and validate ``messages`` into a Batch (no database work)."""
        metrics, events, births, statuses = [], [], [], []
        seen: dict[str, tuple[str, float]] = {}
        rejected: collections.Counter = collections.Counter()
        for message in messages:
            try:
                parsed = self.parse(message)
            except Rejected as exc:
                rejected[exc.reason] += 1
                self._log_rejection(exc)
                continue
            if parsed is None:
                continue
            kind, fleet, device, model, text = parsed
            if kind is Kind.METRICS:
                metrics.append((device, model, message.received, text))
            elif kind is Kind.EVENTS:
                events.append(
                    (
                        device,
                        model.boot,
                        model.seq,
                        model.ts,
                        message.received,
                        model.event,
                        model.level,
                        json.dumps(model.data),
                    )
                )
            elif kind is Kind.BIRTH:
                births.append(
                    (
                        device,
                        fleet,
                        model.ts,
                        text,
                        model.boot,
                        {
                            "runtime_version": model.runtime_version,
                            "device": model.device,
                            "bundle": model.bundle.model_dump() if model.bundle else None,
                        },
                    )
                )
            elif kind is Kind.STATUS:
                statuses.append(
                    (
                        device,
                        fleet,
                        model.ts,
                        model.state,
                        model.boot,
                        model.reason,
                        message.received,
                    )
                )
            if kind in (Kind.METRICS, Kind.EVENTS):
                last = seen.get(device)
                if last is None or last[1] < message.received:
                    seen[device] = (fleet, message.received)
        return Prepared(Batch(metrics, events, births, statuses, seen), len(messages), rejected)

    def commit(self, prepared: Prepared) -> None:
        """Store a prepared batch in one transaction and count it.

        Raises:
            StorageError: the database failed; nothing was counted, retry the same batch.
        """
        batch = prepared.batch
        stored, duplicates = self.storage.store(batch)
        with self.stats.lock:
            self.stats.received += prepared.received
            self.stats.stored += stored
            self.stats.duplicates += duplicates
            self.stats.births += len(batch.births)
            self.stats.statuses += len(batch.statuses)
            self.stats.rejected.update(prepared.rejected)
            self.stats.batches += 1

    def _log_rejection(self, exc: Rejected) -> None:
        now = time.monotonic()
        if now - self._last_log >= 1.0:  # at most one line a second, whatever the flood
            self._last_log = now
            log.warning("rejected message (%s): %s", exc.reason, exc)
