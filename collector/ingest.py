"""Turning raw MQTT messages into stored records: validate, count, never crash.

Anything malformed (not JSON, an unknown schema version, a wrong-typed or out-of-range
field, an oversized payload, a topic outside the protocol) is quarantined: written raw, with
its error, to the ``quarantine`` table, counted by reason and logged (rate-limited), and
ingest carries on with the next message. A message the database refuses is found by
splitting the batch and quarantined too, so no one message can stall the fleet; a database
that refuses everything is an outage, and the batch waits, unacknowledged, until it is back.
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
    check_name,
    parse_topic,
)

from .errors import StorageError
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
    quarantined: int = 0  # rows written to the quarantine table
    quarantine_failed: int = 0  # could not even be quarantined: counted, acknowledged
    batches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass(frozen=True)
class RawMessage:
    topic: str
    payload: bytes
    received: float
    retained: bool = False
    size: int | None = None  # the whole payload's size when ``payload`` is only its start


# What goes into a Batch: (kind, row) where kind is a Kind or "quarantine", and the raw
# message it came from (to quarantine it if the database refuses the row).
Entry = tuple[Kind | str, tuple, RawMessage]
QUARANTINE = "quarantine"


@dataclass
class Prepared:
    """A parsed batch waiting to be stored; ``pending`` shrinks as parts of it are stored."""

    pending: list[Entry]
    received: int
    rejected: collections.Counter
    births: int = 0
    statuses: int = 0


def build_batch(entries: list[Entry]) -> Batch:
    """Sort entries into one Batch; ``seen`` is each device's latest stream arrival."""
    lists: dict[Kind | str, list[tuple]] = {
        Kind.METRICS: [],
        Kind.EVENTS: [],
        Kind.BIRTH: [],
        Kind.STATUS: [],
        QUARANTINE: [],
    }
    boot_ends: list[tuple] = []
    seen: dict[str, tuple[str, float]] = {}
    for kind, row, message in entries:
        if kind == "boot_end":
            boot_ends.append(row)
            continue
        lists[kind].append(row)
        if kind is Kind.METRICS or kind is Kind.EVENTS:
            device = row[0]
            last = seen.get(device)
            if last is None or last[1] < message.received:
                seen[device] = (_fleet_of(message.topic), message.received)
    return Batch(
        lists[Kind.METRICS],
        lists[Kind.EVENTS],
        lists[Kind.BIRTH],
        lists[Kind.STATUS],
        seen,
        boot_ends,
        lists[QUARANTINE],
    )


def _shown(topic: str) -> str:
    """A topic for a log line: a 20,000-character topic must not become a 20 kB line."""
    return repr(topic if len(topic) <= 120 else f"{topic[:120]}…")


def _fleet_of(topic: str) -> str:
    return topic.split("/", 3)[2]


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
            raise Rejected("bad_topic", f"topic {_shown(message.topic)} is not an edgepack topic")
        fleet, device, kind = place
        for name, what in ((fleet, "fleet"), (device, "device id")):
            try:
                check_name(name, what)
            except ValueError as exc:
                raise Rejected("bad_topic", f"topic {_shown(message.topic)}: {exc}") from None
        if kind is Kind.CMD:
            return None  # commands go to devices; collectors only listen
        size = len(message.payload) if message.size is None else message.size
        if size > self.max_payload_bytes:
            raise Rejected(
                "oversized",
                f"{size} bytes > {self.max_payload_bytes} on {message.topic}",
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

    def ingest(self, messages: list[RawMessage]) -> None:
        """Parse and store ``messages``; count everything.

        Raises:
            StorageError: the database is down (not a message's fault): nothing of the
                batch may be acknowledged (the service keeps the Prepared and commits it
                again; see ``prepare`` and ``commit``).
        """
        self.commit(self.prepare(messages))

    def prepare(self, messages: list[RawMessage]) -> Prepared:
        """Parse and validate ``messages`` into entries (no database work)."""
        pending: list[Entry] = []
        rejected: collections.Counter = collections.Counter()
        births = statuses = 0
        for message in messages:
            try:
                parsed = self.parse(message)
                if parsed is None:
                    continue
                kind, fleet, device, model, text = parsed
                if kind is Kind.METRICS:
                    row = (device, model, message.received, text)
                elif kind is Kind.EVENTS:
                    row = (
                        device,
                        model.boot,
                        model.seq,
                        model.ts,
                        message.received,
                        model.event,
                        model.level,
                        json.dumps(model.data),
                    )
                elif kind is Kind.BIRTH:
                    births += 1
                    facts = {
                        "runtime_version": model.runtime_version,
                        "device": model.device,
                        "bundle": model.bundle.model_dump() if model.bundle else None,
                    }
                    row = (device, fleet, model.ts, text, model.boot, facts)
                    if model.previous_boot_last_seq is not None and model.boot > 0:
                        end = (device, model.boot - 1, model.previous_boot_last_seq)
                        pending.append(("boot_end", end, message))
                else:
                    statuses += 1
                    row = (
                        device,
                        fleet,
                        model.ts,
                        model.state,
                        model.boot,
                        model.reason,
                        message.received,
                    )
                    if model.last_seq is not None:
                        pending.append(("boot_end", (device, model.boot, model.last_seq), message))
            except Exception as exc:
                if not isinstance(exc, Rejected):  # a bug: loud, but it must not stall ingest
                    log.error("parsing a message on %s failed", _shown(message.topic), exc_info=exc)
                    exc = Rejected("internal_error", f"{type(exc).__name__}: {exc}")
                rejected[exc.reason] += 1
                self._log_rejection(exc)
                pending.append((QUARANTINE, quarantine_row(message, exc.reason, str(exc)), message))
                continue
            pending.append((kind, row, message))
        return Prepared(pending, len(messages), rejected, births, statuses)

    def commit(self, prepared: Prepared) -> None:
        """Store a prepared batch and count it; quarantine what the database refuses.

        The whole batch goes in one transaction. If that fails while the database still
        takes writes, the batch is split in halves until the messages it refuses are found;
        each is quarantined (or counted, if even that fails). Afterwards ``prepared.pending``
        is empty: every message is stored or quarantined, and the batch can be acknowledged.

        Raises:
            StorageError: the database does not take writes (an outage). What was stored
                stays stored and leaves ``pending``; commit the same Prepared again later.
        """
        # (entries, tried again): a chunk that failed is tried once more before it is split,
        # since the probe may just have replaced a dead connection.
        chunks = collections.deque([(list(prepared.pending), False)])
        while chunks:
            chunk, again = chunks.popleft()
            try:
                self._store(prepared, chunk)
                continue
            except Exception as exc:
                failure = exc
            if not self.storage.writable():
                raise StorageError(f"the database does not take writes: {failure}") from failure
            if not again:
                chunks.appendleft((chunk, True))
            elif len(chunk) > 1:
                middle = len(chunk) // 2
                chunks.extendleft([(chunk[middle:], False), (chunk[:middle], False)])
            else:
                self._quarantine_refused(prepared, chunk[0], failure)
        with self.stats.lock:
            self.stats.received += prepared.received
            self.stats.births += prepared.births
            self.stats.statuses += prepared.statuses
            self.stats.rejected.update(prepared.rejected)
            self.stats.batches += 1
        prepared.rejected = collections.Counter()

    def _store(self, prepared: Prepared, chunk: list[Entry]) -> None:
        batch = build_batch(chunk)
        stored, duplicates = self.storage.store(batch)
        if len(chunk) == len(prepared.pending):
            prepared.pending = []
        else:
            done = {id(entry) for entry in chunk}
            prepared.pending = [entry for entry in prepared.pending if id(entry) not in done]
        with self.stats.lock:
            self.stats.stored += stored
            self.stats.duplicates += duplicates
            self.stats.quarantined += len(batch.quarantine)

    def _quarantine_refused(self, prepared: Prepared, entry: Entry, failure: Exception) -> None:
        """One entry the database refused, twice, while it takes other writes."""
        kind, _, message = entry
        if not isinstance(failure, StorageError):  # a bug rather than the data: say so loudly
            log.error("storing a message on %s failed", _shown(message.topic), exc_info=failure)
        error = f"{type(failure).__name__}: {failure}"
        kept = False
        if kind != QUARANTINE:  # else the quarantine row itself was refused: count it only
            try:
                self.storage.quarantine([quarantine_row(message, "storage_refused", error)])
                kept = True
            except Exception as exc:
                if not self.storage.writable():
                    raise StorageError(f"the database does not take writes: {exc}") from exc
            prepared.rejected["storage_refused"] += 1
            self._log_rejection(Rejected("storage_refused", f"{_shown(message.topic)}: {error}"))
        with self.stats.lock:
            if kept:
                self.stats.quarantined += 1
            else:
                self.stats.quarantine_failed += 1
        if not kept:
            log.error(
                "could not quarantine a message on %s (%s); counted only",
                _shown(message.topic),
                error,
            )
        prepared.pending = [item for item in prepared.pending if item is not entry]

    def _log_rejection(self, exc: Rejected) -> None:
        now = time.monotonic()
        if now - self._last_log >= 1.0:  # at most one line a second, whatever the flood
            self._last_log = now
            log.warning("rejected message (%s): %s", exc.reason, exc)


def quarantine_row(message: RawMessage, reason: str, error: str) -> tuple:
    """(received, topic, reason, error, size, payload): the raw message and why it failed."""
    size = len(message.payload) if message.size is None else message.size
    return (message.received, message.topic, reason, error, size, message.payload)
