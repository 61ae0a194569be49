"""Measure one model in a fresh process: load time, the format's timings, peak memory.

Run as ``python -m packager.measure_worker REQUEST.json``. The request names the
format's loader (``"loader": "module:function"``): called with the request, it loads the
model and returns a function that runs the timed work and returns its figures. The worker
prints one JSON line, the same shape for every format::

    {"load_seconds": 0.042, "peak_memory_mb": 61.3, ...the format's figures}

``peak_memory_mb`` is the model's memory: the process's peak resident set size after
loading and running the model, minus its resident set size just before the engine was
imported and the model loaded (Python, numpy and the request are not counted). The
build's memory-fit check compares this figure with the profile's budget for every format.
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
import time


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so the peak covers only the model."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    # ru_maxrss (KiB on Linux) cannot be reset; it is the fallback off Linux.
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(request: dict) -> dict:
    """Load and run the model as ``request`` says; the figures, in the one shape."""
    module_name, function_name = request["loader"].split(":")
    loader = getattr(importlib.import_module(module_name), function_name)
    _reset_peak()
    baseline = _status_mb("VmRSS") or _peak_rss_mb()
    started = time.perf_counter()
    bench = loader(request)
    load_seconds = time.perf_counter() - started
    figures = bench()
    return {
        "load_seconds": round(load_seconds, 3),
        "peak_memory_mb": round(max(_peak_rss_mb() - baseline, 0.0), 1),
        **figures,
    }


def main(request_path: str) -> None:
    with open(request_path, encoding="utf-8") as handle:
        request = json.load(handle)
    print(json.dumps(measure(request)))


if __name__ == "__main__":
    main(sys.argv[1])
