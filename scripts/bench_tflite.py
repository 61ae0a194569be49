"""Benchmark the TFLite path of edgepack on this host, in one run, side by side.

(a) Runtime.run overhead against a bare interpreter loop (``set_tensor``, ``invoke``,
    ``get_tensor``) on the very interpreter the runtime holds, for each model the gate
    chose; a second, separately created interpreter shows the noise floor.
(b) Each recipe against the float source model: file size, latency of bare interpreters
    (interleaved), and agreement with the float model on the held-out data.

Models: MiniLM (sentence embeddings, batch 1 x 128 tokens) and the digits CNN, both
converted by litert-torch. Results print as tables and replace the ``bench_tflite`` section
of docs/benchmarks.md. Run: ``.venv/bin/python scripts/bench_tflite.py [--quick] [--no-write]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs as a plain script, installed package or not

from bench_onnx import Plan, interleaved, load_eval  # noqa: E402  (after the path is set)
from benchdoc import cpu_model, markdown_tables, write_section  # noqa: E402

PROFILE = "x86-64-avx2"
OVERHEAD_GOAL = 1.03
RECIPES = ("int8-static", "int8-dynamic", "fp16", "as-is")


@dataclass(frozen=True)
class Model:
    """One example model and what the benchmark reports about it."""

    label: str
    example: object
    classification: bool


def bare_interpreter(path: Path, threads: int):
    """An interpreter set up as the runtime sets up its own (XNNPACK on), and a call that
    runs it the way a hand-written loop does."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    runner = interpreter.get_signature_runner()
    inputs = {name: d["index"] for name, d in runner.get_input_details().items()}
    outputs = {name: d["index"] for name, d in runner.get_output_details().items()}
    del runner  # the interpreter refuses to run while a runner holds a reference
    interpreter.allocate_tensors()
    return interpreter, bare_call(interpreter, inputs, outputs)


def bare_call(interpreter, inputs: dict[str, int], outputs: dict[str, int]):
    def call(feed: dict):
        for name, index in inputs.items():
            interpreter.set_tensor(index, feed[name])
        interpreter.invoke()
        return {name: interpreter.get_tensor(index) for name, index in outputs.items()}

    return call


def similarity(candidate: dict, reference: dict, labels, classification: bool) -> str:

    from edge_runtime.selftest import cosine_rows

    name = next(iter(reference))
    cosine = cosine_rows(candidate[name], reference[name])
    text = f"cosine mean {cosine.mean():.5f}, min {cosine.min():.5f}"
    if classification:
        agree = (candidate[name].argmax(1) == reference[name].argmax(1)).mean()
        text += f"; top-1 agreement {agree * 100:.1f}%"
        if labels is not None:
            text += f", accuracy {(candidate[name].argmax(1) == labels).mean() * 100:.1f}%"
    return text


def bench_overhead(model: Model, bundle: Path, pub: Path, threads: int, plan, tick) -> list:
    """(a) One row: Runtime.run against the bare loop on the runtime's own interpreter."""
    from edge_runtime import Runtime
    from edge_runtime.runtime import InputChecker

    data, _ = load_eval(model.example.eval)
    feed = {k: v[:1].copy() for k, v in data.items()}
    with Runtime.open(bundle, pub, threads=threads) as runtime:
        manifest = runtime.manifest
        session = runtime.backend.session
        same = bare_call(session.interpreter, session.input_indices, session.output_indices)
        _, fresh = bare_interpreter(runtime.model_dir / manifest.model.path, threads)
        _, fresh_again = bare_interpreter(runtime.model_dir / manifest.model.path, threads)
        timing = interleaved(
            {
                "runtime": lambda: runtime.run(feed),
                "bare": lambda: same(feed),
                "fresh": lambda: fresh(feed),
                "fresh2": lambda: fresh_again(feed),
            },
            plan,
            tick,
        )
        checker, started = InputChecker(manifest.inputs), time.perf_counter()
        for _ in range(1000):
            checker(feed)
        check_us = (time.perf_counter() - started) * 1000
    ratio = timing.ratio("runtime", "bare")
    return [
        f"{model.label} {manifest.model.recipe}",
        f"{timing.p50_ms('bare'):.3f}",
        f"{timing.p50_ms('runtime'):.3f}",
        f"{ratio:.3f}x ({timing.difference_us('runtime', 'bare'):+.1f} µs)",
        f"<= {OVERHEAD_GOAL}",
        "PASS" if ratio <= OVERHEAD_GOAL else "MISS",
        f"input check {check_us:.1f} µs; fresh interpreters differ by "
        f"{timing.ratio('fresh2', 'fresh'):.3f}x (noise floor)",
    ]


def bench_recipes(model: Model, bundles: dict, pub: Path, threads: int, plan, tick) -> list:
    """(b) Rows per recipe: size, bare latency, and agreement with the float model."""
    from edge_runtime import Runtime
    from packager.passes.evaluate import run_samples

    data, labels = load_eval(model.example.eval)
    feed = {k: v[:1].copy() for k, v in data.items()}
    calls, sizes, outputs, runtimes = {}, {}, {}, []
    try:
        for recipe, bundle in bundles.items():
            runtime = Runtime.open(bundle, pub, threads=threads)
            runtimes.append(runtime)
            path = runtime.model_dir / runtime.manifest.model.path
            sizes[recipe] = path.stat().st_size
            _, calls[recipe] = bare_interpreter(path, threads)
            outputs[recipe] = run_samples(path, data)
        timing = interleaved({r: (lambda c=c: c(feed)) for r, c in calls.items()}, plan, tick)
    finally:
        for runtime in runtimes:
            runtime.close()
    rows = []
    for recipe in bundles:
        rows.append(
            [
                f"{model.label} {recipe}",
                f"{sizes[recipe] / 2**20:.2f}",
                f"{sizes['as-is'] / sizes[recipe]:.2f}x",
                f"{timing.p50_ms(recipe):.3f}",
                f"{timing.ratio('as-is', recipe):.2f}x",
                similarity(outputs[recipe], outputs["as-is"], labels, model.classification),
            ]
        )
    return rows


def run_all(args, plan: Plan, progress):
    from packager.examples import build_example_bundle, make_example, source_fingerprint
    from packager.keys import generate_keypair

    def step(label: str, total: float | None = None):
        task = progress.add_task(label, total=total)
        return (
            lambda: progress.advance(task),
            lambda text: progress.update(task, description=text, total=1, completed=1),
        )

    cache = REPO / ".cache" / "test-models" / source_fingerprint()  # the tests' cache
    cache.mkdir(parents=True, exist_ok=True)
    overhead_rows, recipe_rows, notes = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-tflite-") as tmp:
        work = Path(tmp)
        key, pub = generate_keypair(work / "keys")
        _, done = step("examples: converting with litert-torch (first time: minutes)")
        models = [Model("digits CNN", make_example("digits-cnn-tflite", cache), True)]
        if not args.skip_minilm:
            models.insert(0, Model("MiniLM", make_example("minilm-tflite", cache), False))
        done("examples: ready")
        for model in models:
            _, done = step(f"{model.label}: building one bundle per recipe")
            bundles, started = {}, time.perf_counter()
            for recipe in RECIPES:
                output = work / f"{model.label}-{recipe}.edgepkg".replace(" ", "-")
                build_example_bundle(
                    model.example, key, output, PROFILE, recipe=recipe, max_degradation=1.0
                )
                bundles[recipe] = output
            chain = work / f"{model.label}-chain.edgepkg".replace(" ", "-")
            chosen = build_example_bundle(model.example, key, chain, PROFILE).manifest
            notes.append(_chain_note(model.label, chosen))
            seconds = time.perf_counter() - started
            done(f"{model.label}: {len(bundles) + 1} bundles in {seconds:.0f} s")
            tick, _ = step(f"(a) {model.label}: Runtime.run vs bare invoke", plan.rounds)
            overhead_rows.append(bench_overhead(model, chain, pub, args.threads, plan, tick))
            tick, _ = step(f"(b) {model.label}: recipes vs float", plan.rounds)
            recipe_rows += bench_recipes(model, bundles, pub, args.threads, plan, tick)
    return overhead_rows, recipe_rows, notes


def _chain_note(label: str, manifest) -> str:
    record = manifest.quantization
    tried = ", ".join(
        f"{a.recipe} {a.status}"
        + (f" (degradation {a.metrics['degradation']:.4g})" if a.metrics else "")
        for a in record.attempts
    )
    return f"{label}, {PROFILE} chain at --max-degradation {record.max_degradation}: {tried}"


def tables(overhead_rows: list, recipe_rows: list) -> list[tuple]:
    return [
        (
            "(a) Runtime.run against a bare interpreter loop, same interpreter, batch 1",
            ["Model, recipe", "Bare p50 ms", "Runtime p50 ms", "Ratio", "Goal", "Result", "Detail"],
            overhead_rows,
        ),
        (
            "(b) Recipes against the float model (bare interpreters, XNNPACK on)",
            ["Model, recipe", "MiB", "Smaller", "p50 ms", "Faster", "Against the float model"],
            recipe_rows,
        ),
    ]


def host_facts(threads: int, plan: Plan, quick: bool) -> dict[str, str]:
    from importlib import metadata

    timing = (
        f"{plan.warmup} warm-up calls, then {plan.rounds} interleaved rounds x {plan.calls} "
        "calls per contender; ratios are the median over rounds of the per-round medians"
    )
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "versions": f"ai-edge-litert {metadata.version('ai-edge-litert')}, ai-edge-quantizer "
        f"{metadata.version('ai-edge-quantizer')}, Python {platform.python_version()}",
        "threads": str(threads),
        "timing": timing + (" (--quick: a smoke test, not for comparison)" if quick else ""),
        "load": f"{os.getloadavg()[0]:.2f}",
    }


def render_markdown(facts: dict, results: list[tuple], notes: list[str], command: str) -> str:
    lines = [
        "## TFLite / LiteRT: runtime overhead, recipes against the float model",
        "",
        f"Written by `scripts/bench_tflite.py` on {facts['date']}.",
        "",
        f"- Host: {facts['cpu']}, {facts['cores']} cores; 1-minute load average at the end "
        f"{facts['load']}",
        f"- {facts['versions']}; {facts['threads']} interpreter threads everywhere, XNNPACK on",
        f"- Timing: {facts['timing']}",
        "- Models converted from PyTorch by litert-torch 0.10.0; bundles for "
        f"`{PROFILE}`, one per recipe (`--recipe`, gate opened)",
        *[f"- Gate: {note}" for note in notes],
        f"- Reproduce: `{command}`",
    ]
    lines += markdown_tables(results)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few timing rounds: a smoke test")
    parser.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md alone")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-minilm", action="store_true", help="only the digits CNN")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    plan = Plan(3, 4, 10) if args.quick else Plan(20, 20, 50)
    console = Console()
    if not console.is_terminal:
        console.width = 170
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        overhead_rows, recipe_rows, notes = run_all(args, plan, progress)
    facts = host_facts(args.threads, plan, args.quick)
    results = tables(overhead_rows, recipe_rows)
    colours = {"PASS": "[green]PASS[/]", "MISS": "[bold red]MISS[/]"}
    for title, header, rows in results:
        table = Table(*header, title=title)
        for row in rows:
            table.add_row(*[colours.get(cell, cell) for cell in row])
        console.print(table)
    for note in notes:
        console.print(f"gate: {note}")
    console.print(f"[dim]{facts['versions']}; {facts['timing']}[/]")
    if not args.no_write:
        flags = [flag for flag in argv if flag != "--no-write"]
        command = " ".join([".venv/bin/python scripts/bench_tflite.py", *flags])
        write_section("bench_tflite", render_markdown(facts, results, notes, command))
        console.print("updated docs/benchmarks.md (section bench_tflite)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
