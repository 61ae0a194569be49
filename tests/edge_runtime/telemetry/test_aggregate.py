"""Tests for edge_runtime/telemetry/aggregate.py (inference statistics and vital signs)."""

from __future__ import annotations

import os
import platform
import threading
import time

import numpy as np
import pytest

from edge_runtime.telemetry.aggregate import (
    BUCKETS_MS,
    MAX_SAMPLES,
    InferenceStats,
    VitalSigns,
    device_facts,
)
from edge_runtime.telemetry.protocol import LatencyHistogram


def record_all(stats: InferenceStats, seconds) -> None:
    for value in seconds:
        stats.record(float(value))


@pytest.mark.parametrize("size", [1, 2, 7, 1000, 1001])
def test_snapshot_figures_match_numpy(size):
    seconds = np.random.default_rng(size).lognormal(mean=-5.0, sigma=1.5, size=size)
    milliseconds = seconds * 1000.0
    stats = InferenceStats()
    record_all(stats, seconds)

    latency = stats.snapshot()["latency"]

    for name, q in (("p50_ms", 50), ("p95_ms", 95), ("p99_ms", 99)):
        assert latency[name] == pytest.approx(np.percentile(milliseconds, q, method="nearest"))
    assert latency["max_ms"] == pytest.approx(milliseconds.max())
    assert latency["mean_ms"] == pytest.approx(milliseconds.mean())
    assert latency["count"] == size


def test_histogram_counts_match_numpy():
    seconds = np.random.default_rng(3).lognormal(mean=-4.0, sigma=2.5, size=5000)
    expected = np.bincount(
        np.searchsorted(BUCKETS_MS, seconds * 1000.0, side="left"), minlength=len(BUCKETS_MS) + 1
    )
    stats = InferenceStats()
    record_all(stats, seconds)

    latency = stats.snapshot()["latency"]

    assert latency["buckets_ms"] == [float(bound) for bound in BUCKETS_MS]
    assert latency["counts"] == expected.tolist()
    assert sum(latency["counts"]) == 5000
    assert 0 not in latency["counts"][3:12]  # the data really spans the buckets


@pytest.mark.parametrize(
    ("seconds", "bucket"),
    [
        (0.0, 0),
        (0.0001, 0),  # 0.1 ms: a bound belongs to the bucket it closes
        (0.00011, 1),
        (0.001, 3),
        (0.0011, 4),
        (10.0, len(BUCKETS_MS) - 1),
        (10.001, len(BUCKETS_MS)),  # above the last bound: the overflow bucket
        (3600.0, len(BUCKETS_MS)),
    ],
)
def test_histogram_bucket_edges(seconds, bucket):
    stats = InferenceStats()
    stats.record(seconds)

    counts = stats.snapshot()["latency"]["counts"]

    assert len(counts) == len(BUCKETS_MS) + 1
    assert counts[bucket] == 1
    assert sum(counts) == 1


def test_counts_errors_and_tokens_per_second():
    stats = InferenceStats()
    stats.record(0.5, tokens=10)
    stats.record(0.25, ok=False, tokens=5)
    stats.record(1.0)  # no tokens: not part of the token rate
    stats.record(0.1, ok=False)

    figures = stats.snapshot()

    assert figures["inferences"] == 4
    assert figures["errors"] == 2
    assert figures["tokens_per_s"] == pytest.approx(15 / 0.75)
    assert figures["latency"]["count"] == 4


def test_snapshot_resets_the_interval():
    stats = InferenceStats()
    stats.record(0.01, ok=False, tokens=3)
    stats.snapshot()

    figures = stats.snapshot()

    assert figures["inferences"] == 0
    assert figures["errors"] == 0
    assert figures["tokens_per_s"] is None
    latency = figures["latency"]
    assert latency["count"] == 0
    assert [latency[k] for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms")] == [None] * 5
    assert latency["counts"] == [0] * (len(BUCKETS_MS) + 1)


def test_interval_measures_the_time_since_the_last_snapshot():
    stats = InferenceStats()
    stats.snapshot()
    started = time.monotonic()
    time.sleep(0.05)

    interval = stats.snapshot()["interval_s"]

    assert 0.05 <= interval <= time.monotonic() - started + 0.01


@pytest.mark.parametrize("record", [False, True])
def test_snapshot_is_a_valid_latency_histogram(record):
    stats = InferenceStats()
    if record:
        record_all(stats, [0.001, 0.002, 0.5])

    latency = stats.snapshot()["latency"]

    assert LatencyHistogram.model_validate(latency).count == (3 if record else 0)


def test_record_from_many_threads_loses_nothing():
    stats = InferenceStats()
    threads, per_thread = 8, 5000
    start = threading.Barrier(threads)

    def work(index: int) -> None:
        start.wait()
        for i in range(per_thread):
            stats.record(0.001, ok=(i % 10 != 0), tokens=1)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    figures = stats.snapshot()

    assert figures["inferences"] == threads * per_thread
    assert figures["errors"] == threads * per_thread // 10
    assert figures["latency"]["count"] == threads * per_thread
    assert figures["tokens_per_s"] == pytest.approx(1000.0)


def test_latency_samples_are_bounded_but_counts_are_not():
    stats = InferenceStats()
    extra = 25

    for _ in range(MAX_SAMPLES + extra):
        stats.record(0.002, ok=False)
    figures = stats.snapshot()

    assert figures["inferences"] == MAX_SAMPLES + extra
    assert figures["errors"] == MAX_SAMPLES + extra
    assert figures["latency"]["count"] == MAX_SAMPLES
    assert sum(figures["latency"]["counts"]) == MAX_SAMPLES


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc")
def test_vital_signs_are_sane_on_linux(tmp_path):
    vitals = VitalSigns(tmp_path)
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:  # burn some CPU so the figure is not zero
        pass

    process, system = vitals.snapshot()

    assert set(process) == {"cpu_percent", "rss_mb"}
    assert 0 < process["cpu_percent"] <= 100 * os.cpu_count() + 5
    assert 10 < process["rss_mb"] < 1_000_000
    assert set(system) == {
        "mem_total_mb",
        "mem_available_mb",
        "temperature_c",
        "disk_free_mb",
        "uptime_s",
    }
    assert 0 < system["mem_available_mb"] <= system["mem_total_mb"]
    assert system["disk_free_mb"] > 0
    assert system["uptime_s"] > 0
    assert system["temperature_c"] is None or -40 < system["temperature_c"] < 150


def test_vital_signs_report_no_disk_for_a_missing_folder(tmp_path):
    vitals = VitalSigns(tmp_path / "missing")

    _, system = vitals.snapshot()

    assert system["disk_free_mb"] is None


def test_device_facts():
    facts = device_facts()

    assert set(facts) == {"arch", "cores", "ram_mb", "os", "kernel", "python", "hostname"}
    assert facts["arch"] == platform.machine()
    assert facts["cores"] == os.cpu_count()
    assert facts["python"] == platform.python_version()
    assert facts["os"]
    if platform.system() == "Linux":
        assert facts["ram_mb"] > 0
