"""Speed check: a quantized candidate timed against the prepared float model on this host.

Quantizing is for size and speed; a recipe that made the model slower than float on the
CPU it is built for should not be chosen. The two models are opened the way the device
opens them (the profile's backend settings: threads, arena, spinning), fed the same batch-1
sample, warmed up, then run in alternating pairs (float, candidate, candidate, float, ...)
so that drift on the host (another process, frequency scaling) hits both the same. The
medians of the two series are compared.

The verdict counts only where the host shares the profile's instruction-set class: an x86
profile built on an x86 host. Elsewhere (an arm64 profile built on x86) the figures are
recorded as not representative and refuse nothing.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_runtime.cpus import usable_cpus
from edge_runtime.manifest import SpeedCheck

# A candidate is refused below this ratio (float latency / candidate latency). Medians of
# interleaved runs of two copies of one model on a busy 2-core host differ by up to ~3%
# (see docs/quantization.md, "Speed check"), so 0.95 refuses a real slowdown, not noise.
SLOWER_THAN_FLOAT = 0.95

WARMUP_RUNS = 3
MIN_PAIRS = 15
MAX_PAIRS = 300
BUDGET_S = 3.0  # after MIN_PAIRS, stop adding pairs once both series took this long

_ARCH_CLASS = {"aarch64": "arm64", "arm64": "arm64", "armv8": "arm64", "amd64": "x86_64"}


def arch_class(name: str) -> str:
    """One name per instruction-set class: aarch64/arm64 -> arm64, amd64/x86_64 -> x86_64."""
    name = name.strip().lower()
    return _ARCH_CLASS.get(name, name)


def is_representative(profile_arch: Any, host_arch: str | None = None) -> bool:
    """Whether timings on this host say something about the profile's device
    (``profile_arch``: the profile's ``arch``, an enum or its value)."""
    wanted = str(getattr(profile_arch, "value", profile_arch))
    return arch_class(wanted) == arch_class(host_arch or platform.machine())


def host_threads(threads: int) -> int:
    """The device's thread count, capped at the CPUs this process may use (0: all of them).

    The cap is ``usable_cpus``, the runtime's own (affinity and cgroup quota), not the
    host's core count: in a container limited to 2 CPUs a profile's 8 threads would
    oversubscribe them and time slower than the device that runs the bundle would.
    """
    usable = usable_cpus().count
    return min(threads or usable, usable)


def time_side_by_side(
    run_reference: Callable[[], Any],
    run_candidate: Callable[[], Any],
    *,
    warmup: int = WARMUP_RUNS,
    min_pairs: int = MIN_PAIRS,
    max_pairs: int = MAX_PAIRS,
    budget_s: float = BUDGET_S,
) -> tuple[float, float]:
    """Median latency in ms of (reference, candidate), timed in alternating pairs."""
    for _ in range(warmup):
        run_reference()
        run_candidate()
    reference_ms: list[float] = []
    candidate_ms: list[float] = []
    started = time.perf_counter()
    for index in range(max_pairs):
        # ABBA order: neither model always runs right after the other, so a cache or
        # frequency effect of going first does not favour one of them.
        order = (
            ((run_reference, reference_ms), (run_candidate, candidate_ms))
            if index % 2 == 0
            else ((run_candidate, candidate_ms), (run_reference, reference_ms))
        )
        for run, timings in order:
            begun = time.perf_counter()
            run()
            timings.append((time.perf_counter() - begun) * 1000)
        if index + 1 >= min_pairs and time.perf_counter() - started >= budget_s:
            break
    return statistics.median(reference_ms), statistics.median(candidate_ms)


def speed_check(
    pipeline, profile, candidate: Path, reference: Path, inputs: dict[str, Any]
) -> SpeedCheck:
    """Time ``candidate`` against ``reference`` (the prepared float model) on ``inputs``
    (one batch-1 sample), both opened with the profile's backend settings."""
    spec = pipeline.backend_spec(profile)
    threads = host_threads(getattr(spec, "intra_op_threads", 0))
    reference_session = pipeline.host_session(reference, threads=threads, backend=spec)
    candidate_session = pipeline.host_session(candidate, threads=threads, backend=spec)
    reference_ms, candidate_ms = time_side_by_side(
        lambda: reference_session.run(inputs), lambda: candidate_session.run(inputs)
    )
    return SpeedCheck(
        candidate_ms=round(candidate_ms, 4),
        reference_ms=round(reference_ms, 4),
        ratio=round(reference_ms / candidate_ms, 3),
        representative=is_representative(profile.arch),
    )


def slower_reason(speed: SpeedCheck) -> str | None:
    """Why the candidate is refused for its speed, or None when it is not."""
    if speed.representative and speed.ratio < SLOWER_THAN_FLOAT:
        return f"slower than fp32 on this host ({speed.ratio:.2g}x)"
    return None
