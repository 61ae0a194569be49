"""Benchmark the runtime's thread cap: bundles for bigger devices against bare engines.

Bundles built for bigger devices than this host, run as a new user would run them, against
bare engines with their own defaults:

(a) MiniLM built for x86-64-avx512-vnni (8 intra-op threads, spinning on): Runtime.run,
    opened with no overrides (the runtime caps the 8 threads at the CPUs this process may
    use), against a bare ``onnxruntime.InferenceSession`` on the same model file created as
    a user would (default SessionOptions: ONNX Runtime's own thread count for this host);
    batch 1, sequence 128, interleaved blocks (goal: runtime / bare latency <= 1.03). A
    second bare default session, timed in the same rounds, shows the noise floor.
    For reference, a bare session with the profile's 8 threads and spinning on: what the
    runtime did before the cap.
(b) SmolLM2 built for raspberry-pi-5 (4 threads, Q4_K_M): Runtime.generate, opened with no
    overrides, against a bare ``llama_cpp.Llama`` on the same file with its defaults
    (``n_threads`` = half the host's cores, ``n_threads_batch`` = all; only ``n_ctx`` is
    set, to the bundle's, so only the thread defaults differ) through streamed
    ``create_completion``; decode tokens/s, interleaved runs, medians (goal: runtime /
    bare >= 0.97). For reference, the runtime with the profile's 4 threads given
    explicitly: what it did before the cap.

Results print as a table (``--json``: the figures) and replace the ``bench_threads``
section of docs/benchmarks.md (``--no-write`` leaves it). Run from the repository root:
``.venv/bin/python scripts/bench_threads.py [--quick] [--only onnx|llm] [--json] [--no-write]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs as a plain script, installed package or not

import bench_llm  # noqa: E402  (after the path is set)
import bench_onnx  # noqa: E402
from benchdoc import DOC, host_line, markdown_tables, progress_notes, write_section  # noqa: E402

ONNX_PROFILE = "x86-64-avx512-vnni"
LLM_PROFILE = "raspberry-pi-5"
LLM_QUANT = "Q4_K_M"
ONNX_GOAL = 1.03  # Runtime.run latency / bare session latency, at most
LLM_GOAL = 0.97  # Runtime.generate decode tokens/s / bare Llama tokens/s, at least


@dataclass(frozen=True)
class Plan:
    """How much to time: ONNX blocks (bench_onnx's Plan), LLM runs and tokens per run."""

    onnx: bench_onnx.Plan
    reference_onnx: bench_onnx.Plan  # the slow uncapped reference: fewer, shorter blocks
    llm: bench_llm.Plan
    reference_llm_runs: int


FULL = Plan(bench_onnx.Plan(10, 20, 25), bench_onnx.Plan(3, 6, 10), bench_llm.Plan(7, 128, 0), 3)
QUICK = Plan(bench_onnx.Plan(2, 2, 5), bench_onnx.Plan(1, 1, 3), bench_llm.Plan(1, 16, 0), 1)


@dataclass(frozen=True)
class Row:
    """One figure: the runtime against a bare engine; ``goal`` None for a reference row."""

    figure: str
    runtime: str
    bare: str
    ratio: float
    goal: str
    passed: bool | None
    detail: str

    @property
    def verdict(self) -> str:
        return "info" if self.passed is None else ("PASS" if self.passed else "MISS")


def minilm_inputs(eval_path: Path) -> dict:
    """The first eval sentence, batch 1, sequence 128, as bench_onnx feeds MiniLM."""
    data, _ = bench_onnx.load_eval(eval_path)
    return {name: value[:1].copy() for name, value in data.items()}


def default_session(model: Path):
    """An ONNX Runtime session as a user makes one: default options, CPU provider."""
    import onnxruntime as ort

    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def profile_session(model: Path, threads: int):
    """A session with the profile's threads and spinning (on), as the runtime made one
    before the cap."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(
        str(model), sess_options=options, providers=["CPUExecutionProvider"]
    )


def bench_onnx_threads(bundle: Path, pub: Path, eval_path: Path, plan: Plan, note) -> list[Row]:
    """(a) Runtime.run, capped, against a bare default session on the same file; then, for
    reference, a bare session with the profile's threads against the same default one."""
    from edge_runtime import Runtime

    inputs = minilm_inputs(eval_path)
    with Runtime.open(bundle, pub) as runtime:
        choice, info = runtime.threads_used, runtime.info()
        model = runtime.model_dir / runtime.manifest.model.path
        # Two separately created sessions of one file differ by a few percent on their own
        # (memory placement); a second bare session shows that noise floor.
        bare, bare_again = default_session(model), default_session(model)
        names = [output.name for output in bare.get_outputs()]
        note("(a) MiniLM: Runtime.run against a bare default session")
        timing = bench_onnx.interleaved(
            {
                "runtime": lambda: runtime.run(inputs),
                "bare": lambda: bare.run(names, inputs),
                "bare_again": lambda: bare_again.run(names, inputs),
            },
            plan.onnx,
            lambda: None,
        )
        before = profile_session(model, choice.profile)
        note(f"(a) MiniLM: a bare session with the profile's {choice.profile} threads")
        reference = bench_onnx.interleaved(
            {"before": lambda: before.run(names, inputs), "bare": lambda: bare.run(names, inputs)},
            plan.reference_onnx,
            lambda: None,
        )
    ratio = timing.ratio("runtime", "bare")
    spinning = "on" if info["allow_spinning"] else "off"
    return [
        Row(
            f"(a) MiniLM {ONNX_PROFILE}, latency, Runtime.run / bare default session",
            f"{timing.p50_ms('runtime'):.2f} ms ({info['threads']} threads, spinning {spinning})",
            f"{timing.p50_ms('bare'):.2f} ms (ONNX Runtime's default threads)",
            ratio,
            f"<= {ONNX_GOAL}",
            ratio <= ONNX_GOAL,
            f"batch 1, seq 128; profile {choice.profile} threads, usable {choice.cpus.describe()}",
        ),
        Row(
            "(a) noise floor: a second bare default session / the first",
            "-",
            f"{timing.p50_ms('bare_again'):.2f} ms / {timing.p50_ms('bare'):.2f} ms",
            timing.ratio("bare_again", "bare"),
            "-",
            None,
            "timed in the same interleaved rounds as the row above",
        ),
        Row(
            f"(a) reference: the profile's {choice.profile} threads, spinning on (before the "
            "cap) / bare default session",
            f"{reference.p50_ms('before'):.2f} ms",
            f"{reference.p50_ms('bare'):.2f} ms",
            reference.ratio("before", "bare"),
            "-",
            None,
            "two bare sessions; what Runtime.run cost before the cap",
        ),
    ]


def bare_default_llama(path: Path, context_length: int):
    """A llama-cpp-python model as a user makes one: its defaults, but the bundle's n_ctx."""
    llama_cpp = bench_llm.quiet_llama_cpp()
    return llama_cpp.Llama(model_path=str(path), n_ctx=context_length, verbose=False)


def decode_rate(runs: list) -> float:
    return statistics.median(run.decode_rate for run in runs)


def bench_llm_threads(bundle: Path, pub: Path, plan: Plan, note) -> list[Row]:
    """(b) Runtime.generate, capped, against a bare default Llama on the same file."""
    from edge_runtime import Runtime

    count = plan.llm.tokens
    with Runtime.open(bundle, pub) as runtime:
        choice = runtime.threads_used
        model = runtime.model_dir / runtime.manifest.model.path
        context = runtime.manifest.llm.context_length
        bare = bare_default_llama(model, context)
        bare_threads = f"n_threads {bare.n_threads}, n_threads_batch {bare.n_threads_batch}"
        runs = bench_llm.interleaved(
            {
                "runtime": lambda: bench_llm.runtime_run(runtime, bench_llm.PROMPT, count),
                "bare": lambda: bench_llm.completion_run(bare, bench_llm.PROMPT, count),
            },
            plan.llm.repetitions,
            lambda message: note(f"(b) SmolLM2 decode {count} tokens, {message}"),
        )
        bare.close()
        threads = runtime.info()["threads"]
    with Runtime.open(bundle, pub, threads=choice.profile) as before:
        uncapped = bench_llm.interleaved(
            {"before": lambda: bench_llm.runtime_run(before, bench_llm.PROMPT, count)},
            plan.reference_llm_runs,
            lambda message: note(f"(b) SmolLM2 with the profile's threads, {message}"),
        )
    ratio = decode_rate(runs["runtime"]) / decode_rate(runs["bare"])
    spread = {
        name: f"{decode_rate(found):.1f} tok/s ({min(r.decode_rate for r in found):.1f}-"
        f"{max(r.decode_rate for r in found):.1f})"
        for name, found in {**runs, **uncapped}.items()
    }
    return [
        Row(
            f"(b) SmolLM2 {LLM_PROFILE} {LLM_QUANT}, decode tokens/s, Runtime.generate / bare "
            "default Llama",
            f"{spread['runtime']}, {threads} threads",
            f"{spread['bare']}, {bare_threads}",
            ratio,
            f">= {LLM_GOAL}",
            ratio >= LLM_GOAL,
            f"{count} tokens, n_ctx {context}, median of {plan.llm.repetitions}; profile "
            f"{choice.profile} threads, usable {choice.cpus.describe()}",
        ),
        Row(
            f"(b) reference: the profile's {choice.profile} threads (before the cap) / bare "
            "default Llama",
            spread["before"],
            spread["bare"],
            decode_rate(uncapped["before"]) / decode_rate(runs["bare"]),
            "-",
            None,
            f"Runtime.open(threads={choice.profile}), median of {plan.reference_llm_runs}",
        ),
    ]


def run_all(args, plan: Plan, note) -> list[Row]:
    """Build the bundles (examples cached with the tests') and measure each figure."""
    from edge_runtime.cpus import usable_cpus
    from packager.examples import build_example_bundle, make_example, source_fingerprint
    from packager.keys import generate_keypair

    note(f"this process may use {usable_cpus().describe()}")
    cache = REPO / ".cache" / "test-models" / source_fingerprint()  # the tests' cache
    cache.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        work = Path(tmp)
        key, pub = generate_keypair(work / "keys")
        if args.only in (None, "onnx"):
            note("MiniLM example (exported once, cached)")
            minilm = make_example("minilm", cache)
            note(f"building the MiniLM bundle for {ONNX_PROFILE}")
            bundle = work / "minilm-vnni.edgepkg"
            build_example_bundle(minilm, key, bundle, ONNX_PROFILE, measure=False)
            rows += bench_onnx_threads(bundle, pub, minilm.eval, plan, note)
        if args.only in (None, "llm"):
            note("SmolLM2 example (made once, cached)")
            smollm2 = make_example("smollm2", cache)
            note(f"building the SmolLM2 bundle for {LLM_PROFILE} ({LLM_QUANT})")
            bundle = work / "smollm2-pi5.edgepkg"
            build_example_bundle(smollm2, key, bundle, LLM_PROFILE, quant=LLM_QUANT)
            rows += bench_llm_threads(bundle, pub, plan, note)
    return rows


def result_table(rows: list[Row]) -> tuple:
    header = ["Figure", "Runtime", "Bare", "Ratio", "Goal", "Result", "Detail"]
    cells = [
        [r.figure, r.runtime, r.bare, f"{r.ratio:.3f}", r.goal, r.verdict, r.detail] for r in rows
    ]
    return ("Runtime against bare engines with their defaults", header, cells)


def facts(args, plan: Plan, minutes: float, loads: tuple[float, float]) -> list[str]:
    """The lines above the table: host, usable CPUs, engines, timing."""
    import llama_cpp
    import onnxruntime

    from edge_runtime.cpus import usable_cpus

    timing = (
        f"ONNX: {plan.onnx.warmup} warm-up calls, then {plan.onnx.rounds} interleaved rounds x "
        f"{plan.onnx.calls} calls per contender, ratio = median over rounds of the per-round "
        f"medians; LLM: {plan.llm.repetitions} interleaved runs of {plan.llm.tokens} tokens "
        "after one warm-up each, KV cache reset before every run, decode = tokens/s from the "
        "first token to the last"
    )
    return [
        f"Written by `scripts/bench_threads.py` on {host_line()}; this process may use "
        f"{usable_cpus().describe()}; onnxruntime {onnxruntime.__version__}, llama-cpp-python "
        f"{llama_cpp.__version__}; {minutes:.1f} min run, 1-min load average {loads[0]:.2f} "
        f"at its start and {loads[1]:.2f} at its end.",
        "",
        "- Runtime: `Runtime.open(bundle, pubkey)` with no overrides, as a new user runs a "
        "bundle built for a bigger device; the runtime caps the profile's threads at the CPUs "
        "this process may use (docs/runtime.md)",
        "- Bare: the same model file in the engine as a user would create it, with the "
        "library's defaults for this host's cores",
        f"- Timing: {timing}"
        + (" (--quick: a smoke test, not for comparison)" if args.quick else ""),
    ]


def render_markdown(lines: list[str], rows: list[Row], command: str) -> str:
    body = ["## Threads: bundles for bigger devices on this host, runtime vs bare engines", ""]
    body += [*lines, f"- Reproduce: `{command}`"]
    body += markdown_tables([result_table(rows)])
    return "\n".join(body) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, and update docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few calls and runs: a smoke test")
    parser.add_argument("--only", choices=["onnx", "llm"], help="measure one part only")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md alone")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    plan = QUICK if args.quick else FULL
    console = Console(stderr=args.json)
    if not console.is_terminal:
        console.width = 160
    started, load = time.perf_counter(), os.getloadavg()[0]
    with progress_notes(console, started) as note:
        rows = run_all(args, plan, note)
    minutes = (time.perf_counter() - started) / 60
    lines = facts(args, plan, minutes, (load, os.getloadavg()[0]))

    title, header, cells = result_table(rows)
    colours = {"PASS": "[green]PASS[/]", "MISS": "[bold red]MISS[/]", "info": "[cyan]info[/]"}
    table = Table(*header, title=title)
    for row in cells:
        table.add_row(*[colours.get(cell, cell) for cell in row])
    console.print(table)
    for line in lines:
        console.print(line, markup=False, highlight=False)
    flags = [flag for flag in argv if flag not in ("--no-write", "--json")]
    command = " ".join([".venv/bin/python scripts/bench_threads.py", *flags])
    if not args.no_write:
        write_section("bench_threads", render_markdown(lines, rows, command))
        console.print(f"updated {DOC.relative_to(REPO)}")
    if args.json:
        payload = {
            "host": lines[0],
            "rows": [asdict(row) | {"verdict": row.verdict} for row in rows],
        }
        print(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
