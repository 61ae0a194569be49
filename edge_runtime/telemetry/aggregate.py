"""In-process aggregation of inference timings, and the device's vital signs.

``record`` is on the inference hot path: one lock, a few counters, one append (~1 µs).
Everything else (percentiles, the histogram, reading /proc) happens in ``snapshot``, on
the telemetry thread, every reporting interval.
"""

from __future__ import annotations

import os
import platform
import shutil
import threading
import time
from bisect import bisect_left
from pathlib import Path
from typing import Any

# Upper bounds in milliseconds; one more bucket catches everything above the last.
BUCKETS_MS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]
MAX_SAMPLES = 200_000  # per interval; beyond this, only counts are kept (bounded memory)


def _percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


class InferenceStats:
    """Counts, latencies and tokens since the last snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._latencies_s: list[float] = []
        self._unsampled = 0  # inferences beyond MAX_SAMPLES: counted, not timed
        self._errors = 0
        self._tokens = 0
        self._token_seconds = 0.0
        self._since = time.monotonic()

    def record(self, seconds: float, ok: bool = True, tokens: int = 0) -> None:
        """Record one inference (cheap; safe from any thread).

        The common case (success, no tokens) takes no lock: ``list.append`` is atomic
        under the GIL, and the count is the list's length. A sample racing with
        ``snapshot`` can land in the interval just closed; no lock is worth that on the
        hot path of a model that answers in microseconds.
        """
        latencies = self._latencies_s
        if len(latencies) < MAX_SAMPLES:
            latencies.append(seconds)
        else:
            with self._lock:
                self._unsampled += 1
        if not ok or tokens:
            with self._lock:
                self._errors += not ok
                self._tokens += tokens
                self._token_seconds += seconds if tokens else 0.0

    def snapshot(self) -> dict[str, Any]:
        """Figures since the last snapshot, and start a new interval."""
        with self._lock:
            latencies, unsampled, errors = self._latencies_s, self._unsampled, self._errors
            tokens, token_seconds, since = self._tokens, self._token_seconds, self._since
            self._reset()
        count = len(latencies) + unsampled
        latencies = sorted(value * 1000.0 for value in latencies)
        counts = [0] * (len(BUCKETS_MS) + 1)
        for value in latencies:
            counts[bisect_left(BUCKETS_MS, value)] += 1
        have = bool(latencies)
        return {
            "interval_s": round(time.monotonic() - since, 3),
            "inferences": count,
            "errors": errors,
            "latency": {
                "count": len(latencies),
                "p50_ms": _percentile(latencies, 0.50) if have else None,
                "p95_ms": _percentile(latencies, 0.95) if have else None,
                "p99_ms": _percentile(latencies, 0.99) if have else None,
                "max_ms": latencies[-1] if have else None,
                "mean_ms": sum(latencies) / len(latencies) if have else None,
                "buckets_ms": [float(bound) for bound in BUCKETS_MS],
                "counts": counts,
            },
            "tokens_per_s": (tokens / token_seconds) if token_seconds > 0 else None,
        }


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None


def _meminfo_mb() -> dict[str, float | None]:
    text = _read("/proc/meminfo") or ""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            values[key] = int(rest.split()[0]) / 1024
    return {"mem_total_mb": values.get("MemTotal"), "mem_available_mb": values.get("MemAvailable")}


def temperature_c() -> float | None:
    """The first thermal zone's temperature, where the OS exposes one (Pi, Jetson)."""
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*/temp")):
        text = _read(str(zone))
        if text and text.strip().lstrip("-").isdigit():
            return int(text.strip()) / 1000.0
    return None


class VitalSigns:
    """Process CPU and RSS, system memory, temperature, disk and uptime; no psutil needed."""

    def __init__(self, disk_path: Path) -> None:
        self.disk_path = disk_path
        self._last_cpu = sum(os.times()[:2])
        self._last_wall = time.monotonic()

    def snapshot(self) -> tuple[dict[str, float | None], dict[str, float | None]]:
        cpu, wall = sum(os.times()[:2]), time.monotonic()
        cpu_percent = 100.0 * (cpu - self._last_cpu) / max(wall - self._last_wall, 1e-9)
        self._last_cpu, self._last_wall = cpu, wall
        statm = (_read("/proc/self/statm") or "").split()
        rss_mb = int(statm[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20 if len(statm) > 1 else None
        uptime = _read("/proc/uptime")
        try:
            disk_free_mb = shutil.disk_usage(self.disk_path).free / 2**20
        except OSError:
            disk_free_mb = None
        process = {"cpu_percent": round(cpu_percent, 2), "rss_mb": rss_mb}
        system = {
            **_meminfo_mb(),
            "temperature_c": temperature_c(),
            "disk_free_mb": disk_free_mb,
            "uptime_s": float(uptime.split()[0]) if uptime else None,
        }
        return process, system


def device_facts() -> dict[str, Any]:
    """Static facts for ``birth``: architecture, cores, RAM, OS."""
    os_release = _read("/etc/os-release") or ""
    pretty = next(
        (
            line.split("=", 1)[1].strip('"')
            for line in os_release.splitlines()
            if line.startswith("PRETTY_NAME=")
        ),
        platform.platform(),
    )
    return {
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "ram_mb": _meminfo_mb()["mem_total_mb"],
        "os": pretty,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "hostname": platform.node(),
    }
