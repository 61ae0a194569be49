"""Measure one ONNX or TFLite model in a fresh process: load time, latency, peak memory.

Run as ``python -m packager.measure_worker REQUEST.json``; prints one JSON line.
A fresh process keeps the peak-memory figure free of the packager's own allocations.
"""

from __future__ import annotations

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


def _load_onnx(request: dict):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = request["threads"]
    options.enable_cpu_mem_arena = request["cpu_mem_arena"]
    if not request["allow_spinning"]:  # as the device runtime will run it
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(request["model"], options, providers=request["providers"])
    return lambda inputs: session.run(None, inputs)


def _load_tflite(request: dict):
    from pathlib import Path

    from edge_runtime.backends.tflite import TfliteSession

    # The same session class the device backend runs the model with.
    return TfliteSession(Path(request["model"]), request["threads"], request["xnnpack"]).run


def main(request_path: str) -> None:
    import numpy as np

    with open(request_path, encoding="utf-8") as handle:
        request = json.load(handle)
    with np.load(request["inputs"], allow_pickle=False) as data:
        inputs = {key: data[key] for key in data.files}
    _reset_peak()
    baseline = _status_mb("VmRSS") or _peak_rss_mb()
    started = time.perf_counter()
    run = _load_tflite(request) if request.get("format") == "tflite" else _load_onnx(request)
    load_seconds = time.perf_counter() - started
    for _ in range(request["warmup"]):
        run(inputs)
    timings = []
    for _ in range(request["runs"]):
        started = time.perf_counter()
        run(inputs)
        timings.append((time.perf_counter() - started) * 1000)
    print(
        json.dumps(
            {
                "runs": len(timings),
                "latency_ms_p50": float(np.percentile(timings, 50)),
                "latency_ms_p95": float(np.percentile(timings, 95)),
                "peak_memory_mb": max(_peak_rss_mb() - baseline, 0.0),
                "load_seconds": load_seconds,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
