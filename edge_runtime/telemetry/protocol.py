"""The telemetry protocol: topics and payload schemas, shared by devices and collectors.

Topics live under ``edgepack/v1/<fleet>/<device>/<kind>``. Payloads are JSON objects with
``schema`` (this module's SCHEMA_VERSION), ``ts`` (Unix seconds) and, for the metrics and
events stream, ``boot`` and ``seq``: ``boot`` counts process starts on the device's disk and
``seq`` rises within a boot, so (device, boot, seq) names each message exactly once.
See docs/telemetry.md.
"""

from __future__ import annotations

import functools
import math
import re
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
TOPIC_ROOT = "edgepack/v1"
MAX_PAYLOAD_BYTES = 64 * 1024  # collectors refuse anything bigger
# fullmatch, not match with "$": "$" also matches before a trailing newline.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
INT64_MAX = 2**63 - 1  # every integer a collector stores is a 64-bit signed column

# Bounded, so a valid message always fits the database: a number the schema accepts can
# never fail an insert (or overflow a sum) and stall the ingest of every device.
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
Seq = Annotated[int, Field(ge=1, le=INT64_MAX)]
# Short labels (event names, versions, reasons): no control characters (NUL is refused by
# PostgreSQL text columns) and no bidirectional overrides (they make a page lie about what
# it shows), and of sane length.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _printable(value: str) -> str:
    found = _UNPRINTABLE.search(value)
    if found:
        raise ValueError(
            f"character U+{ord(found.group()):04X} at {found.start()} is a control or "
            "bidirectional-override character"
        )
    return value


Label = Annotated[str, Field(max_length=256), AfterValidator(_printable)]


class Kind(str, Enum):
    STATUS = "status"
    BIRTH = "birth"
    METRICS = "metrics"
    EVENTS = "events"
    CMD = "cmd"


def check_name(value: str, what: str) -> str:
    """Fleet and device ids become topic levels: no wildcards, slashes or spaces."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        shown = value if not isinstance(value, str) or len(value) <= 64 else value[:64] + "…"
        length = f" ({len(value)} characters)" if isinstance(value, str) and len(value) > 64 else ""
        raise ValueError(
            f"{what} {shown!r}{length} is not a valid name: use 1-128 letters, digits, '.', "
            "'_' or '-', starting with a letter or digit"
        )
    return value


def topic(fleet: str, device: str, kind: Kind) -> str:
    return f"{TOPIC_ROOT}/{fleet}/{device}/{kind.value}"


def fleet_filter(fleet: str) -> str:
    """Subscription filter for every device of a fleet (``+`` for every fleet)."""
    return f"{TOPIC_ROOT}/{fleet}/+/+"


@functools.lru_cache(maxsize=65536)  # a fleet's topics repeat: parse each once
def parse_topic(name: str) -> tuple[str, str, Kind] | None:
    """``(fleet, device, kind)`` of a telemetry topic, or None if it is not one."""
    parts = name.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != TOPIC_ROOT:
        return None
    try:
        return parts[2], parts[3], Kind(parts[4])
    except ValueError:
        return None


def check_json_value(value: Any) -> Any:
    """An open JSON object (``device``, ``data``) holds no NaN/Infinity and no huge integer.

    pydantic's JSON parser accepts the ``NaN`` and ``Infinity`` tokens, which are not JSON;
    and Python's ``json`` refuses to write an integer of more than 4300 digits.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError("NaN and Infinity are not JSON numbers")
        elif isinstance(item, int) and not isinstance(item, bool):
            if not -INT64_MAX - 1 <= item <= INT64_MAX:
                raise ValueError("an integer beyond 64 bits")
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(check_json_value)]


class _Strict(BaseModel):
    # Strict types: a string where a number belongs is a wrong-typed field, not coerced.
    # Floats are finite: the NaN and Infinity tokens (and 1e999) are refused.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Payload(_Strict):
    schema_: Literal[1] = Field(alias="schema")
    ts: float


class StatusPayload(Payload):
    state: Literal["online", "offline"]
    boot: Count
    reason: Label | None = None
    last_seq: Count | None = Field(
        None, description="on a clean stop: the last seq this boot committed to its outbox"
    )


class BundleFacts(_Strict):
    id: Label
    name: Label
    version: Label
    profile: Label
    backend: Label
    recipe: Label


class BirthPayload(Payload):
    boot: Count
    runtime_version: Label
    device: JsonObject
    bundle: BundleFacts | None = None
    previous_boot_last_seq: Count | None = Field(
        None,
        description="the last seq boot - 1 committed to the outbox (null on a first boot), so "
        "a collector counts the lost tail of a boot that ended in a crash",
    )


class LatencyHistogram(_Strict):
    count: Count
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    mean_ms: float | None
    buckets_ms: list[float] = Field(description="upper bounds of the histogram buckets")
    counts: list[Count] = Field(description="samples per bucket; one more than buckets_ms")


class StreamPayload(Payload):
    boot: Count
    seq: Seq


class MetricsPayload(StreamPayload):
    interval_s: float
    inferences: Count
    errors: Count
    latency: LatencyHistogram
    tokens_per_s: float | None = None
    process: dict[str, float | None]
    system: dict[str, float | None]
    outbox: dict[str, Count]


class EventPayload(StreamPayload):
    event: Label
    level: Literal["info", "warning", "error"] = "info"
    data: JsonObject = Field(default_factory=dict)


class Command(str, Enum):
    REPORT_COUNTS = "report_counts"


class CommandPayload(Payload):
    """A request on a device's ``cmd`` topic; the device answers with an ``events`` message."""

    id: Label = Field(description="echoed in the answer, to match it to the request")
    command: Command


PAYLOAD_MODELS: dict[Kind, type[Payload]] = {
    Kind.STATUS: StatusPayload,
    Kind.BIRTH: BirthPayload,
    Kind.METRICS: MetricsPayload,
    Kind.EVENTS: EventPayload,
}
