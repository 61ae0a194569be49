"""Benchmark the ONNX path of edgepack on this host, in one run, side by side.

(a) Runtime.run overhead against a bare ``onnxruntime.InferenceSession.run`` on the same
    model file, options, providers and inputs (MiniLM int8, batch 1, sequence 128).
(b) MiniLM: the int8 recipe the gate chose against the fp32 source model: size, latency
    and mean cosine similarity on the held-out sentences.
(c) Digits CNN: top-1 agreement of the chosen int8 model with fp32, and the accuracy drop.
(d) Wall time of the MiniLM build (``edgepack build`` with measurement), and per profile.

Results print as tables and replace the ``bench_onnx`` section of docs/benchmarks.md.
Run from the repository root: ``.venv/bin/python scripts/bench_onnx.py [--quick] [--no-write]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs as a plain script, installed package or not

from benchdoc import DOC, cpu_model, markdown_tables, write_section  # noqa: E402  (after the path is set)

PROFILE = "x86-64-avx2"
# name -> (figure, what is measured, comparison, goal, unit): the project's targets.
GOALS = {
    "overhead": ("a", "MiniLM int8 latency, Runtime.run / its session.run", "<=", 1.03, "x"),
    "size": ("b", "MiniLM model size, fp32 / int8", ">=", 3.8, "x"),
    "speedup": ("b", "MiniLM latency, fp32 / int8 (bare sessions)", ">=", 1.8, "x"),
    "cosine": ("b", "MiniLM mean cosine, int8 vs fp32, held-out sentences", ">=", 0.99, ""),
    "agreement": ("c", "Digits top-1 agreement, int8 vs fp32, held-out images", ">=", 99, "%"),
    "drop": ("c", "Digits accuracy drop, fp32 - int8", "<=", 1, " point"),
    "build": ("d", f"MiniLM build wall time, {PROFILE}, measure=True", "", None, ""),
}


@dataclass(frozen=True)
class Plan:
    """How much timing to do: warm-up calls, then ``rounds`` blocks of ``calls`` each."""

    warmup: int
    rounds: int
    calls: int


@dataclass(frozen=True)
class Figure:
    """One benchmark figure with its goal; ``passed`` is None when there is no goal."""

    key: str
    title: str
    value: str
    goal: str
    passed: bool | None
    detail: str = ""

    @property
    def verdict(self) -> str:
        return "info" if self.passed is None else ("PASS" if self.passed else "MISS")


def figure(name: str, value: float, shown: str, detail: str) -> Figure:
    """The figure ``name`` of GOALS, judged against its goal."""
    key, title, comparison, goal, unit = GOALS[name]
    if goal is None:
        return Figure(key, title, shown, "-", None, detail)
    passed = bool(value <= goal if comparison == "<=" else value >= goal)
    return Figure(key, title, shown, f"{comparison} {goal:g}{unit}", passed, detail)


@dataclass(frozen=True)
class Timing:
    """Interleaved timings: each round's median, and every call, in seconds, by contender."""

    rounds: dict[str, list[float]]
    calls: dict[str, list[float]]

    def p50_ms(self, name: str) -> float:
        """Median latency over all calls of ``name``, in milliseconds."""
        return statistics.median(self.calls[name]) * 1000

    def ratio(self, top: str, bottom: str) -> float:
        """Median over rounds of round-median(top) / round-median(bottom)."""
        pairs = zip(self.rounds[top], self.rounds[bottom], strict=True)
        return statistics.median(a / b for a, b in pairs)

    def difference_us(self, top: str, bottom: str) -> float:
        """Median over rounds of round-median(top) - round-median(bottom), in microseconds."""
        pairs = zip(self.rounds[top], self.rounds[bottom], strict=True)
        return statistics.median(a - b for a, b in pairs) * 1e6


def interleaved(contenders: dict[str, Callable[[], object]], plan: Plan, tick) -> Timing:
    """Time the contenders in alternating blocks of ``plan.calls`` calls.

    The order flips every round, so slow drift (clock boost, other processes) hits both
    alike; blocks rather than single calls keep one session's spinning worker threads out
    of the other's timings.
    """
    for run in contenders.values():
        for _ in range(plan.warmup):
            run()
    names = list(contenders)
    rounds: dict[str, list[float]] = {name: [] for name in names}
    calls: dict[str, list[float]] = {name: [] for name in names}
    for index in range(plan.rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            run, block = contenders[name], []
            for _ in range(plan.calls):
                started = time.perf_counter()
                run()
                block.append(time.perf_counter() - started)
            rounds[name].append(statistics.median(block))
            calls[name].extend(block)
        tick()
    return Timing(rounds, calls)


def bare_session(model: Path, threads: int, arena: bool, providers: list[str]):
    """An ONNX Runtime session set up as the runtime's ONNX backend sets up its own."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = arena
    return ort.InferenceSession(str(model), sess_options=options, providers=providers)


def load_eval(path: Path) -> tuple[dict, object]:
    """The eval .npz as (inputs by name, labels or None)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    return arrays, arrays.pop("labels", None)


def per_sample(run: Callable[[dict], object], data: dict):
    """Run ``run`` on each sample as a batch of one (as the gate does); stack the results."""
    import numpy as np

    count = len(next(iter(data.values())))
    return np.concatenate([run({k: v[i : i + 1] for k, v in data.items()}) for i in range(count)])


def recipe_note(model: str, manifest) -> str:
    """Which recipe the gate chose for ``model``, and what happened to those tried before."""
    record = manifest.quantization
    before = [
        f"{a.recipe} {a.status}" + (f" ({a.reason})" if a.reason else "")
        for a in record.attempts
        if a.recipe != record.chosen
    ]
    return f"{model}: {record.chosen}" + (f"; tried first: {', '.join(before)}" if before else "")


def recorded(manifest, metric: str) -> float | None:
    """The gate's recorded ``metric`` for the recipe the build chose."""
    for attempt in manifest.quantization.attempts:
        if attempt.recipe == manifest.quantization.chosen:
            return attempt.metrics.get(metric)
    return None


def build(example, profile: str, key: Path, output: Path, measure: bool, note) -> tuple:
    """Run the full ``build_bundle`` for ``profile``; return (result, wall seconds)."""
    from packager.examples import build_example_bundle

    started = time.perf_counter()
    result = build_example_bundle(example, key, output, profile, progress=note, measure=measure)
    return result, time.perf_counter() - started


def bench_overhead(bundle: Path, pub: Path, eval_path: Path, threads: int, plan, tick):
    """(a) Runtime.run against a bare session on the bundle's own model file."""
    from edge_runtime import Runtime
    from edge_runtime.runtime import check_inputs

    inputs = {k: v[:1].copy() for k, v in load_eval(eval_path)[0].items()}
    with Runtime.open(bundle, pub, threads=threads) as runtime:
        manifest = runtime.manifest
        arena, providers = manifest.backend.enable_cpu_mem_arena, runtime.info()["providers"]
        model = runtime.model_dir / manifest.model.path
        # "bare" is the very session the runtime wraps, called directly: two separately
        # created sessions of one file differ by a few percent on their own (memory
        # placement), which would swamp a wrapper costing microseconds. The separate
        # sessions are timed too, to show that noise floor.
        session = runtime.backend.engine
        fresh, fresh_again = (bare_session(model, threads, arena, providers) for _ in range(2))
        names = [output.name for output in session.get_outputs()]
        timing = interleaved(
            {
                "runtime": lambda: runtime.run(inputs),
                "bare": lambda: session.run(names, inputs),
                "fresh": lambda: fresh.run(names, inputs),
                "fresh2": lambda: fresh_again.run(names, inputs),
            },
            plan,
            tick,
        )
        started = time.perf_counter()
        for _ in range(1000):
            check_inputs(manifest.inputs, inputs)
        check_us = (time.perf_counter() - started) * 1000  # per call: / 1000 calls * 1e6
    ratio = timing.ratio("runtime", "bare")
    return figure(
        "overhead",
        ratio,
        f"{ratio:.3f}x ({timing.difference_us('runtime', 'bare'):+.0f} µs)",
        f"batch 1, seq 128, same session: p50 runtime {timing.p50_ms('runtime'):.2f} ms, "
        f"bare {timing.p50_ms('bare'):.2f} ms; input check alone {check_us:.1f} µs. "
        f"Against a separately created session: {timing.ratio('runtime', 'fresh'):.3f}x; "
        f"two fresh bare sessions differ by {timing.ratio('fresh2', 'fresh'):.3f}x (noise floor)",
    )


def bench_minilm(example, bundle: Path, pub: Path, threads: int, plan, tick) -> list[Figure]:
    """(b) The chosen int8 MiniLM against the fp32 source: size, latency, cosine."""
    import numpy as np

    from edge_runtime import Runtime

    data, _ = load_eval(example.eval)
    inputs = {k: v[:1].copy() for k, v in data.items()}
    with Runtime.open(bundle, pub, threads=threads) as runtime:
        manifest = runtime.manifest
        int8_path = runtime.model_dir / manifest.model.path
        options = (threads, manifest.backend.enable_cpu_mem_arena, runtime.info()["providers"])
        fp32, int8 = bare_session(example.model, *options), bare_session(int8_path, *options)
        timing = interleaved(
            {"fp32": lambda: fp32.run(None, inputs), "int8": lambda: int8.run(None, inputs)},
            plan,
            tick,
        )
        first = manifest.outputs[0].name
        quantized = per_sample(lambda s: runtime.run(s)[first], data).astype(np.float64)
        reference = per_sample(lambda s: fp32.run([first], s)[0], data).astype(np.float64)
        fp32_mb, int8_mb = example.model.stat().st_size / 2**20, int8_path.stat().st_size / 2**20
    cosines = (quantized * reference).sum(axis=1) / (
        np.linalg.norm(quantized, axis=1) * np.linalg.norm(reference, axis=1)
    )
    size, speedup, cosine = fp32_mb / int8_mb, timing.ratio("fp32", "int8"), cosines.mean()
    p50s = f"p50 fp32 {timing.p50_ms('fp32'):.2f} ms, int8 {timing.p50_ms('int8'):.2f} ms"
    return [
        figure("size", size, f"{size:.2f}x", f"{fp32_mb:.1f} MB -> {int8_mb:.1f} MB"),
        figure("speedup", speedup, f"{speedup:.2f}x", f"{p50s} (batch 1, seq 128)"),
        figure(
            "cosine",
            cosine,
            f"{cosine:.4f}",
            f"{len(cosines)} sentences, min {cosines.min():.4f}; "
            f"manifest records {recorded(manifest, 'cosine_mean')}",
        ),
    ]


def bench_digits(example, bundle: Path, pub: Path, threads: int) -> list[Figure]:
    """(c) The chosen int8 digits CNN against fp32: top-1 agreement and accuracy drop."""
    from edge_runtime import Runtime

    data, labels = load_eval(example.eval)
    with Runtime.open(bundle, pub, threads=threads) as runtime:
        manifest = runtime.manifest
        first = manifest.outputs[0].name
        options = (threads, manifest.backend.enable_cpu_mem_arena, runtime.info()["providers"])
        fp32 = bare_session(example.model, *options)
        quantized = per_sample(lambda s: runtime.run(s)[first], data).argmax(axis=1)
        reference = per_sample(lambda s: fp32.run([first], s)[0], data).argmax(axis=1)
    agreement = float((quantized == reference).mean()) * 100
    fp32_accuracy, int8_accuracy = (reference == labels).mean(), (quantized == labels).mean()
    drop = float(fp32_accuracy - int8_accuracy) * 100
    gate = f"{len(labels)} images; manifest records {recorded(manifest, 'top1_agreement')}"
    accuracies = f"fp32 {fp32_accuracy:.2%}, int8 {int8_accuracy:.2%}"
    return [
        figure("agreement", agreement, f"{agreement:.2f}%", gate),
        figure("drop", drop, f"{drop:+.2f} points", accuracies),
    ]


def host_facts(threads: int, plan: Plan, quick: bool) -> dict[str, str]:
    """Date, CPU model, core count and versions, for the report."""
    import onnxruntime

    cpu = cpu_model()
    timing = (
        f"{plan.warmup} warm-up calls, then {plan.rounds} interleaved rounds x {plan.calls} "
        "calls per contender; ratios are the median over rounds of the per-round medians"
    )
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "threads": str(threads),
        "timing": timing + (" (--quick: a smoke test, not for comparison)" if quick else ""),
    }


def result_tables(figures: list[Figure], builds: list[tuple]) -> list[tuple]:
    """The results as (title, header, rows) tables, shared by the console and the docs."""
    header = ["Fig.", "Figure", "Measured", "Goal", "Result", "Detail"]
    rows = [[f.key, f.title, f.value, f.goal, f.verdict, f.detail] for f in figures]
    tables = [("Figures", header, rows)]
    if builds:
        rows = [[p, r, f"{s:.1f}", f"{mb:.1f}"] for p, r, s, mb in builds]
        header = ["Profile", "Chosen recipe", "Build seconds", "Bundle MB"]
        tables.append(("MiniLM bundle per shipped profile (measure=False)", header, rows))
    return tables


def render_markdown(facts: dict, tables: list[tuple], notes: list[str], command: str) -> str:
    """The docs section, markers included."""
    lines = [
        "## ONNX: runtime overhead, int8 vs fp32, build time",
        "",
        f"Written by `scripts/bench_onnx.py` on {facts['date']}.",
        "",
        f"- Host: {facts['cpu']}, {facts['cores']} cores (`os.cpu_count()`)",
        f"- onnxruntime {facts['onnxruntime']}, Python {facts['python']}; "
        f"{facts['threads']} intra-op threads in every session",
        f"- Timing: {facts['timing']}",
        *[f"- Chosen recipe, {note}" for note in notes],
        f"- Reproduce: `{command}`",
    ]
    lines += markdown_tables(tables)
    return "\n".join(lines) + "\n"


def print_tables(console, facts: dict, tables: list[tuple], notes: list[str]) -> None:
    """The results as rich tables, verdicts in colour."""
    from rich.table import Table

    colours = {"PASS": "[green]PASS[/]", "MISS": "[bold red]MISS[/]", "info": "[cyan]info[/]"}
    console.print(f"[bold]{facts['cpu']}, {facts['cores']} cores, {facts['date']}[/]")
    for title, header, rows in tables:
        table = Table(*header, title=title)
        for row in rows:
            table.add_row(*[colours.get(cell, cell) for cell in row])
        console.print(table)
    for note in notes:
        console.print(f"chosen recipe, {note}")
    console.print(f"[dim]onnxruntime {facts['onnxruntime']}; {facts['timing']}[/]")


def run_all(args, plan: Plan, progress) -> tuple[list[Figure], list[tuple], list[str]]:
    """Build the bundles and measure every figure; return (figures, per-profile builds, notes)."""
    from packager.examples import make_example, source_fingerprint
    from packager.keys import generate_keypair
    from packager.profiles import shipped_profile_names

    def step(label: str, total: float | None = None):
        task = progress.add_task(label, total=total)
        tick = lambda: progress.advance(task)  # noqa: E731
        note = lambda message: progress.update(task, description=f"{label}: {message[:60]}")  # noqa: E731
        done = lambda text: progress.update(task, description=text, total=1, completed=1)  # noqa: E731
        return tick, note, done

    cache = REPO / ".cache" / "test-models" / source_fingerprint()  # the tests' cache
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        work = Path(tmp)
        key, pub = generate_keypair(work / "keys")
        _, _, done = step("examples: exporting MiniLM, training the digits CNN (once)")
        minilm, digits = make_example("minilm", cache), make_example("digits-cnn", cache)
        done("examples: ready")

        _, note, done = step(f"(d) MiniLM build {PROFILE}, measure=True")
        built, seconds = build(minilm, PROFILE, key, work / "minilm.edgepkg", True, note)
        done(f"(d) MiniLM build {PROFILE}: {seconds:.1f} s")
        notes = [recipe_note("MiniLM", built.manifest)]
        size_mb = built.bundle.stat().st_size / 2**20
        detail = f"{size_mb:.1f} MB bundle; the process's first build, imports included"
        build_figure = figure("build", seconds, f"{seconds:.1f} s", detail)

        tick, _, _ = step("(a) Runtime.run vs bare session.run", plan.rounds)
        figures = [bench_overhead(built.bundle, pub, minilm.eval, args.threads, plan, tick)]
        tick, _, _ = step("(b) MiniLM int8 vs fp32", plan.rounds)
        figures += bench_minilm(minilm, built.bundle, pub, args.threads, plan, tick)

        _, note, done = step(f"(c) digits build {PROFILE}")
        digits_built, _ = build(digits, PROFILE, key, work / "digits.edgepkg", False, note)
        note("comparing with fp32")
        figures += bench_digits(digits, digits_built.bundle, pub, args.threads)
        notes.append(recipe_note("digits CNN", digits_built.manifest))
        done("(c) digits: done")
        figures.append(build_figure)

        builds = []
        for profile in [] if args.skip_profiles else shipped_profile_names():
            _, note, done = step(f"(d) MiniLM build {profile}, measure=False")
            output = work / f"minilm-{profile}.edgepkg"
            result, seconds = build(minilm, profile, key, output, False, note)
            size_mb = output.stat().st_size / 2**20
            builds.append((profile, result.manifest.quantization.chosen, seconds, size_mb))
            done(f"(d) MiniLM build {profile}: {seconds:.1f} s")
    return figures, builds, notes


def main(argv: list[str] | None = None) -> int:
    """Run every benchmark, print the tables, and update docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few timing rounds: a smoke test")
    parser.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md alone")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads (all cores)"
    )
    parser.add_argument("--skip-profiles", action="store_true", help="skip per-profile builds")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    plan = Plan(3, 4, 10) if args.quick else Plan(10, 20, 25)
    console = Console(stderr=args.json)
    if not console.is_terminal:
        console.width = 160  # a log file has room; 80 columns would wrap every row
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        figures, builds, notes = run_all(args, plan, progress)

    facts = host_facts(args.threads, plan, args.quick)
    tables = result_tables(figures, builds)
    print_tables(console, facts, tables, notes)
    flags = [flag for flag in argv if flag not in ("--no-write", "--json")]
    command = " ".join([".venv/bin/python scripts/bench_onnx.py", *flags])
    if not args.no_write:
        write_section("bench_onnx", render_markdown(facts, tables, notes, command))
        console.print(f"updated {DOC.relative_to(REPO)}")
    if args.json:
        payload = {"host": facts, "figures": [asdict(f) for f in figures], "builds": builds}
        print(json.dumps({**payload, "recipes": notes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
