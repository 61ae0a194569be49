"""The telemetry protocol: topics and payload schemas, shared by devices and collectors.

Topics live under ``edgepack/v1/<fleet>/<device>/<kind>``. Payloads are JSON objects with
``schema`` (this module's SCHEMA_VERSION), ``ts`` (Unix seconds) and, for the metrics and
events stream, ``boot`` and ``seq``: ``boot`` counts process starts on the device's disk and
``seq`` rises within a boot, so (device, boot, seq) names each message exactly once.
See docs/telemetry.md.
"""

from __future__ import annotations

import functools
import re
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
TOPIC_ROOT = "edgepack/v1"
MAX_PAYLOAD_BYTES = 64 * 1024  # collectors refuse anything bigger
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class Kind(str, Enum):
    STATUS = "status"
    BIRTH = "birth"
    METRICS = "metrics"
    EVENTS = "events"
    CMD = "cmd"


def check_name(value: str, what: str) -> str:
    """Fleet and device ids become topic levels: no wildcards, slashes or spaces."""
    if not _NAME.match(value or ""):
        raise ValueError(
            f"{what} {value!r} is not a valid name: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
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


class Payload(BaseModel):
    # Strict types: a string where a number belongs is a wrong-typed field, not coerced.
    model_config = ConfigDict(extra="forbid", strict=True)

    schema_: Literal[1] = Field(alias="schema")
    ts: float


class StatusPayload(Payload):
    state: Literal["online", "offline"]
    boot: int = Field(ge=0)
    reason: str | None = None


class BundleFacts(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str
    name: str
    version: str
    profile: str
    backend: str
    recipe: str


class BirthPayload(Payload):
    boot: int = Field(ge=0)
    runtime_version: str
    device: dict[str, Any]
    bundle: BundleFacts | None = None


class LatencyHistogram(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    count: int = Field(ge=0)
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    mean_ms: float | None
    buckets_ms: list[float] = Field(description="upper bounds of the histogram buckets")
    counts: list[int] = Field(description="samples per bucket; one more than buckets_ms")


class StreamPayload(Payload):
    boot: int = Field(ge=0)
    seq: int = Field(ge=1)


class MetricsPayload(StreamPayload):
    interval_s: float
    inferences: int = Field(ge=0)
    errors: int = Field(ge=0)
    latency: LatencyHistogram
    tokens_per_s: float | None = None
    process: dict[str, float | None]
    system: dict[str, float | None]
    outbox: dict[str, int]


class EventPayload(StreamPayload):
    event: str
    level: Literal["info", "warning", "error"] = "info"
    data: dict[str, Any] = Field(default_factory=dict)


PAYLOAD_MODELS: dict[Kind, type[Payload]] = {
    Kind.STATUS: StatusPayload,
    Kind.BIRTH: BirthPayload,
    Kind.METRICS: MetricsPayload,
    Kind.EVENTS: EventPayload,
}
