"""What ONNX Runtime's ``allow_spinning`` costs, both ways, on this host.

For each example model (the demo's MiniLM, int8 as its CPU bundles hold it, sequence 128;
the digits CNN, fp32), two fresh worker processes load it through ``OnnxSession`` (the
class the device runtime uses), one with idle worker threads spinning and one with them
sleeping, and measure:

- latency at load: p50 of back-to-back runs (200, or as many as fit in 3 s);
- a low request rate: 5 requests a second for 5 s, the p50 latency of those requests and
  the process's CPU seconds per wall second (``resource.getrusage``: user + system) over
  the whole window, which is what a device that mostly waits pays.

The on and off workers alternate, twice each (medians of the latencies, mean CPU), so a
change in the host's load hits both alike.

Results print as a table (``--json``: the figures) and replace the ``bench_spinning``
section of docs/benchmarks.md (``--no-write`` leaves it). Run from the repository root:
``.venv/bin/python scripts/bench_spinning.py [--quick] [--json] [--no-write]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs as a plain script, installed package or not

from benchdoc import host_line, markdown_tables, write_section  # noqa: E402  (after the path is set)

MODELS = ("minilm-int8", "digits-cnn")
RATE_PER_S = 5.0
BACK_TO_BACK_SECONDS = 3.0


@dataclass(frozen=True)
class Window:
    """How long each worker measures."""

    back_to_back: int  # runs timed back to back (after warm-up)
    rate_seconds: float  # length of the low-rate window
    rounds: int  # on, off, on, off, ...: drift in the host's load hits both alike


FULL = Window(back_to_back=200, rate_seconds=5.0, rounds=2)
QUICK = Window(back_to_back=40, rate_seconds=2.0, rounds=1)


@dataclass(frozen=True)
class Result:
    model: str
    allow_spinning: bool
    threads: int
    load_p50_ms: float  # back to back
    rate_p50_ms: float  # at RATE_PER_S
    rate_cpu_per_s: float  # process CPU seconds per wall second at RATE_PER_S


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(model: Path, inputs: Path, spinning: bool, threads: int, window: Window) -> dict:
    """One configuration in this process: load, time back to back, then at a low rate."""
    import numpy as np

    from edge_runtime.backends.onnx import OnnxSession

    session = OnnxSession(model, threads=threads, allow_spinning=spinning)
    with np.load(inputs, allow_pickle=False) as data:
        sample = {key: data[key][:1] for key in data.files if key != "labels"}
    for _ in range(5):
        session.run(sample)
    timings: list[float] = []
    # At most back_to_back runs or BACK_TO_BACK_SECONDS, so a slow model keeps the whole
    # bench under two minutes.
    deadline = time.perf_counter() + BACK_TO_BACK_SECONDS
    while len(timings) < window.back_to_back and time.perf_counter() < deadline:
        started = time.perf_counter()
        session.run(sample)
        timings.append((time.perf_counter() - started) * 1000)
    time.sleep(0.5)  # let the spinning threads settle before the idle window
    interval = 1.0 / RATE_PER_S
    paced = []
    wall_start, cpu_start = time.perf_counter(), _cpu_seconds()
    next_at = wall_start
    while time.perf_counter() - wall_start < window.rate_seconds:
        started = time.perf_counter()
        session.run(sample)
        paced.append((time.perf_counter() - started) * 1000)
        next_at += interval
        time.sleep(max(0.0, next_at - time.perf_counter()))
    cpu = _cpu_seconds() - cpu_start
    wall = time.perf_counter() - wall_start
    return {
        "load_p50_ms": round(statistics.median(timings), 3),
        "rate_p50_ms": round(statistics.median(paced), 3),
        "rate_cpu_per_s": round(cpu / wall, 3),
    }


def example(name: str):
    """The model and eval file: digits CNN fp32, or MiniLM int8 as the demo bundles it."""
    from packager.examples import ExampleModel, make_example, source_fingerprint

    cache = Path(os.environ.get("EDGEPACK_TEST_CACHE", REPO / ".cache" / "test-models"))
    folder = cache / source_fingerprint()
    folder.mkdir(parents=True, exist_ok=True)
    if name != "minilm-int8":
        return make_example(name, folder)
    source = make_example("minilm", folder)
    quantized = folder / "minilm-int8-dynamic-per-channel.onnx"
    if not quantized.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # What the int8-dynamic-per-channel recipe makes, which the gate chooses for the
        # demo's CPU profiles.
        partial = quantized.with_suffix(".partial.onnx")
        quantize_dynamic(source.model, partial, per_channel=True, weight_type=QuantType.QInt8)
        partial.replace(quantized)
    return ExampleModel(quantized, source.calibration, source.eval)


def measure(name: str, spinning: bool, threads: int, window: Window) -> Result:
    """Run one configuration in a fresh process, so no other session's threads count."""
    made = example(name)
    command = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps(
            {
                "model": str(made.model),
                "inputs": str(made.eval),
                "spinning": spinning,
                "threads": threads,
                "window": asdict(window),
            }
        ),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"worker for {name} (spinning {spinning}) failed:\n{done.stderr}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return Result(name, spinning, threads, **figures)


def combined(rounds: list[Result]) -> Result:
    """One configuration over its rounds: median latencies, mean CPU per second."""
    first = rounds[0]
    return Result(
        first.model,
        first.allow_spinning,
        first.threads,
        round(statistics.median(r.load_p50_ms for r in rounds), 3),
        round(statistics.median(r.rate_p50_ms for r in rounds), 3),
        round(statistics.fmean(r.rate_cpu_per_s for r in rounds), 3),
    )


def table(results: list[Result]) -> tuple:
    header = [
        "model",
        "allow_spinning",
        "threads",
        "p50 back to back, ms",
        f"p50 at {RATE_PER_S:g}/s, ms",
        f"CPU s per s at {RATE_PER_S:g}/s",
    ]
    rows = [
        [
            r.model,
            "on" if r.allow_spinning else "off",
            str(r.threads),
            f"{r.load_p50_ms:.3g}",
            f"{r.rate_p50_ms:.3g}",
            f"{r.rate_cpu_per_s:.3f}",
        ]
        for r in results
    ]
    return ("allow_spinning, both ways", header, rows)


def ratios(results: list[Result]) -> list[str]:
    lines = []
    for name in dict.fromkeys(r.model for r in results):
        on = next(r for r in results if r.model == name and r.allow_spinning)
        off = next(r for r in results if r.model == name and not r.allow_spinning)
        lines.append(
            f"- {name}: p50 with spinning off / on: {off.load_p50_ms / on.load_p50_ms:.2f}x "
            f"back to back, {off.rate_p50_ms / on.rate_p50_ms:.2f}x at {RATE_PER_S:g}/s; CPU "
            f"at {RATE_PER_S:g}/s: {on.rate_cpu_per_s:.2f} s per s on, "
            f"{off.rate_cpu_per_s:.3f} off."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter windows (a smoke run)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        figures = worker(
            Path(job["model"]),
            Path(job["inputs"]),
            job["spinning"],
            job["threads"],
            Window(**job["window"]),
        )
        print(json.dumps(figures))
        return
    window = QUICK if args.quick else FULL
    started = time.perf_counter()
    measured = [
        measure(name, spinning, args.threads, window)
        for name in args.models
        for _ in range(window.rounds)
        for spinning in (True, False)
    ]
    results = [
        combined([r for r in measured if (r.model, r.allow_spinning) == (name, spinning)])
        for name in args.models
        for spinning in (True, False)
    ]
    seconds = time.perf_counter() - started
    # Other processes' load skews latency (and how much CPU a spinning thread gets): say it.
    load = os.getloadavg()[0]
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        title, header, rows = table(results)
        print("\n".join(markdown_tables([(title, header, rows)])))
        print("\n".join(["", *ratios(results)]))
        print(f"\n{seconds:.0f} s in all, 1-minute load average {load:.1f} at the end")
    if not args.no_write:
        lines = [
            "## allow_spinning (scripts/bench_spinning.py)",
            "",
            f"Host: {host_line()}; 1-minute load average {load:.1f} at the end of the "
            f"{seconds:.0f} s run.",
            "",
            "Each row: a fresh process runs the model through `OnnxSession` at batch 1: the p50 "
            f"of back-to-back runs (up to {window.back_to_back}, or {BACK_TO_BACK_SECONDS:g} s), "
            f"then {RATE_PER_S:g} requests a second for {window.rate_seconds:g} s, with the "
            "process's CPU seconds (user + system) per wall second over that window. On and off "
            f"alternate, {window.rounds} rounds each (median latency, mean CPU).",
            *markdown_tables([table(results)]),
            "",
            *ratios(results),
        ]
        write_section("bench_spinning", "\n".join(lines))


if __name__ == "__main__":
    main()
