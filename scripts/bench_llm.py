"""Benchmark the GGUF (llama.cpp) path of edgepack on this host, in one run.

(a) Quality: SmolLM2-135M-Instruct's F16 source quantized by the packager's own
    GgufQuantize pass to Q8_0, Q4_K_M and Q2_K: size, bits per weight, and perplexity,
    KL divergence and top-1 agreement against F16 on the default eval text (llm_eval).
(b) Generation: a signed raspberry-pi-5 bundle (Q4_K_M) through Runtime.generate against
    bare llama-cpp-python calls on the runtime's own engine object, runtime.backend.engine
    (streamed create_completion, and the low-level Llama.generate loop), so one llama.cpp
    thread pool serves all three; decode tokens/s, interleaved runs, medians
    (goal: runtime / create_completion >= 0.97).
(c) Prompt processing: a ~400-token prompt, time to the first piece, the same two ways
    (goal: runtime / create_completion >= 0.97).
(d) Decode speed against the memory-bandwidth bound: this machine's read bandwidth divided
    by the weight bytes streamed per token, for Q4_K_M, Q8_0 and F16.

Results print as tables and replace the ``bench_llm`` section of docs/benchmarks.md.
Run from the repository root: ``.venv/bin/python scripts/bench_llm.py [--quick] [--no-write]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs as a plain script, installed package or not

from benchdoc import DOC, host_line, progress_notes, write_section  # noqa: E402  (after the path is set)

QUANTS = ("Q8_0", "Q4_K_M", "Q2_K")
QUANT_PROFILE = "x86-64-avx2"
BUNDLE_PROFILE = "raspberry-pi-5"
BUNDLE_QUANT = "Q4_K_M"
GOAL = 0.97  # runtime / bare, for decode tokens/s and prompt processing
WINDOW = 512
PP_TOKENS = 400
SCORE_FORMATS = {
    "perplexity": "{:.3f}",
    "ppl_increase": "{:+.2%}",
    "kl_divergence_mean": "{:.4f}",
    "kl_divergence_p99": "{:.4f}",
    "top1_agreement": "{:.2%}",
}
# A story opening: greedy decoding keeps telling the story instead of ending it early.
PROMPT = (
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker and his curious granddaughter. Every morning"
)


@dataclass(frozen=True)
class Plan:
    """Timed repetitions per contender (after one warm-up each) and tokens per generation."""

    repetitions: int
    tokens: int
    windows: int | None  # eval windows scored in (a); None = all


@dataclass(frozen=True)
class Run:
    """One generation: tokens produced, seconds from the call to the first and last token."""

    tokens: int
    first: float
    last: float

    @property
    def decode_rate(self) -> float:
        """Tokens/s from the first token to the last: decoding only, no prompt processing."""
        return (self.tokens - 1) / (self.last - self.first)

    @property
    def overall_rate(self) -> float:
        return self.tokens / self.last


def quiet_llama_cpp():
    """Import llama_cpp with llama.cpp's own logging silenced."""
    import llama_cpp
    import llama_cpp._logger

    llama_cpp._logger.set_verbose(False)
    return llama_cpp


def bare_llama(path: Path, context_length: int, threads: int):
    """A llama-cpp-python model with the settings the runtime's llama.cpp backend uses."""
    llama_cpp = quiet_llama_cpp()
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=context_length,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        n_gpu_layers=0,
        verbose=False,
    )


def finished(name: str, tokens: int, stamps: list[float], wanted: int) -> Run:
    """The run, once it is sure the model did not end early (that would time less work)."""
    if tokens != wanted:
        raise RuntimeError(
            f"{name} generated {tokens} tokens, not {wanted}: the model ended early; "
            "pick a prompt it continues for longer"
        )
    return Run(tokens, stamps[0], stamps[-1])


def runtime_run(runtime, prompt: str, count: int) -> Run:
    """Runtime.generate, iterated; a timestamp per piece."""
    runtime.backend.engine.reset()
    started = time.perf_counter()
    stream = runtime.generate(prompt, max_tokens=count, temperature=0)
    stamps = [time.perf_counter() - started for _ in stream]
    return finished("Runtime.generate", stream.completion_tokens, stamps, count)


def completion_run(llm, prompt: str, count: int) -> Run:
    """Bare streamed create_completion; a timestamp per text chunk (one per token here)."""
    llm.reset()
    started = time.perf_counter()
    stamps, finish = [], None
    for chunk in llm.create_completion(prompt, max_tokens=count, temperature=0, stream=True):
        choice = chunk["choices"][0]
        if choice["finish_reason"] is None:
            stamps.append(time.perf_counter() - started)
        else:
            finish = choice["finish_reason"]
    return finished("create_completion", len(stamps) if finish == "length" else -1, stamps, count)


def generate_run(llm, prompt: str, count: int) -> Run:
    """The low-level Llama.generate token loop, ``count`` tokens; a timestamp per token."""
    from edge_runtime.backends.llamacpp import is_end_of_generation

    llm.reset()
    started = time.perf_counter()
    tokens, stamps = [], []
    loop = llm.generate(llm.tokenize(prompt.encode(), add_bos=True, special=False), temp=0)
    for token in loop:
        stamps.append(time.perf_counter() - started)
        tokens.append(token)
        if len(tokens) == count:
            break
    loop.close()
    ended = next((i for i, t in enumerate(tokens) if is_end_of_generation(llm, t)), len(tokens))
    return finished("Llama.generate", ended, stamps, count)


def until_first(engine, start: Callable[[], object]) -> float:
    """Reset ``engine`` (no KV-cache prefix reuse: the whole prompt every time), call
    ``start`` and drain what it returns; seconds to the first item (or the end if none)."""
    engine.reset()
    started, first = time.perf_counter(), None
    for _ in start():
        if first is None:
            first = time.perf_counter() - started
    return first if first is not None else time.perf_counter() - started


def interleaved(contenders: dict[str, Callable[[], object]], repetitions: int, note) -> dict:
    """One warm-up each, then ``repetitions`` rounds, the order flipping every round."""
    for name, run in contenders.items():
        note(f"warm-up: {name}")
        run()
    names = list(contenders)
    results: dict[str, list] = {name: [] for name in names}
    for index in range(repetitions):
        for name in names if index % 2 == 0 else names[::-1]:
            note(f"round {index + 1}/{repetitions}: {name}")
            results[name].append(contenders[name]())
    return results


def read_bandwidth(threads: int, tries: int = 5) -> float:
    """Bytes/s: the best of ``tries`` reductions over 1 GiB of float32, ``threads`` slices at
    once (numpy releases the GIL in them). Both sum and max are tried: numpy's float32 sum
    is pairwise and can be compute-bound below what memory delivers; max rarely is."""
    import numpy as np

    data = np.ones(2**30 // 4, dtype=np.float32)
    slices = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for reduce in (np.sum, np.max):
            list(pool.map(reduce, slices))
            for _ in range(tries):
                started = time.perf_counter()
                list(pool.map(reduce, slices))
                best = min(best, time.perf_counter() - started)
    return data.nbytes / best


def streamed_bytes(path: Path) -> tuple[int, bool]:
    """Weight bytes read per generated token, and whether the output matrix is tied.

    The token-embedding table is only indexed (one row per token), unless there is no
    ``output.weight``: then it is also the output projection and is read in full.
    """
    from edge_runtime.gguf import read_gguf

    tensors = read_gguf(path).tensors
    tied = "output.weight" not in {t.name for t in tensors}
    return sum(t.nbytes for t in tensors if tied or t.name != "token_embd.weight"), tied


def verdict(ratio: float) -> str:
    return "PASS" if ratio >= GOAL else "MISS"


def bench_quality(example, work: Path, plan: Plan, note) -> tuple[list, dict[str, Path]]:
    """(a) Quantize with the packager's pass; score every type against F16."""
    from edge_runtime.gguf import read_gguf
    from packager.llm_eval import compare_scores, score_model, tokenize_text, windows
    from packager.passes.base import ModelArtifact, PassContext
    from packager.passes.gguf import GgufQuantize
    from packager.profiles import load_profile

    ctx = PassContext(workdir=work / "quantize", profile=load_profile(QUANT_PROFILE))
    ctx.workdir.mkdir()
    files, seconds = {"F16": example.model}, {}
    for quant in QUANTS:
        note(f"(a) quantizing F16 -> {quant}")
        started = time.perf_counter()
        output, _ = GgufQuantize({"quant_type": quant}).run(
            ModelArtifact(example.model, "gguf"), ctx
        )
        files[quant], seconds[quant] = output.artifact.path, time.perf_counter() - started
    tokens = tokenize_text(example.model, example.eval.read_text(encoding="utf-8"))
    chunks = windows(tokens, WINDOW)[: plan.windows]
    note(f"(a) scoring F16 on {len(chunks)} windows of {len(chunks[0])} tokens")
    source = score_model(example.model, chunks, keep_log_probs=True)
    rows = []
    for name, path in files.items():
        size, params = path.stat().st_size, read_gguf(path).n_parameters
        cells = [name, f"{size / 2**20:.1f}", f"{size * 8 / params:.2f}"]
        if name == "F16":
            rows.append([*cells, f"{source.perplexity:.3f}", "-", "-", "-", "-", "source"])
            continue
        note(f"(a) scoring {name} against F16")
        scores = compare_scores(score_model(path, chunks, reference=source), source)
        shown = [f.format(scores[k]) for k, f in SCORE_FORMATS.items()]
        rows.append([*cells, *shown, f"{seconds[name]:.1f} s"])
    header = ["Type", "MiB", "Bits/weight", "Perplexity", "PPL vs F16", "KL mean", "KL p99"]
    title = (
        f"(a) Quality against F16: {len(chunks)} windows of {len(chunks[0])} tokens, "
        f"{len(source.nll)} scored tokens"
    )
    return [(title, [*header, "Top-1 agreement", "Quantize"], rows)], files


def bench_runtime(bundle: Path, pub: Path, threads: int, plan: Plan, text: str, note):
    """(b) and (c): the bundle through the runtime against bare llama-cpp-python."""
    from edge_runtime.runtime import Runtime

    count = plan.tokens
    with Runtime.open(bundle, pub, threads=threads) as runtime:
        manifest = runtime.manifest
        model = runtime.model_dir / manifest.model.path
        # The bare contenders drive the runtime's own llama.cpp object: a second Llama on
        # the same file would bring a second thread pool, and two pools taking turns on
        # 2 cores made the earlier ratio (0.966) a measure of the pools, not the facade.
        llm = runtime.backend.engine
        gen = interleaved(
            {
                "runtime": lambda: runtime_run(runtime, PROMPT, count),
                "create_completion": lambda: completion_run(llm, PROMPT, count),
                "Llama.generate": lambda: generate_run(llm, PROMPT, count),
            },
            plan.repetitions,
            lambda message: note(f"(b) decode {count} tokens, {message}"),
        )
        pieces = llm.tokenize(text.encode(), add_bos=False, special=False)[:PP_TOKENS]
        long_prompt = llm.detokenize(pieces).decode(errors="ignore")
        prompt_tokens = len(llm.tokenize(long_prompt.encode(), add_bos=True, special=False))
        pp = interleaved(
            {
                "runtime": lambda: until_first(
                    runtime.backend.engine,
                    lambda: runtime.generate(long_prompt, max_tokens=1, temperature=0),
                ),
                "create_completion": lambda: until_first(
                    llm, lambda: llm.create_completion(long_prompt, max_tokens=1, stream=True)
                ),
            },
            plan.repetitions,
            lambda message: note(f"(c) prompt of {prompt_tokens} tokens, {message}"),
        )
        prompt_length = len(llm.tokenize(PROMPT.encode(), add_bos=True, special=False))
        context, weights = manifest.llm.context_length, streamed_bytes(model)
    decode = {name: statistics.median(r.decode_rate for r in runs) for name, runs in gen.items()}
    spread = {
        name: f"{decode[name]:.1f} ({min(r.decode_rate for r in runs):.1f}-"
        f"{max(r.decode_rate for r in runs):.1f})"
        for name, runs in gen.items()
    }
    overall = {name: statistics.median(r.overall_rate for r in runs) for name, runs in gen.items()}
    seconds = {name: statistics.median(times) for name, times in pp.items()}
    goals = {
        "decode": decode["runtime"] / decode["create_completion"],
        "pp": seconds["create_completion"] / seconds["runtime"],
    }
    gen_rows = [["Runtime.generate", spread["runtime"], f"{overall['runtime']:.1f}"]]
    gen_rows[0] += ["-", "-", "-", "info"]
    pp_rows = [["Runtime.generate", f"{seconds['runtime'] * 1000:.1f}"]]
    pp_rows[0] += [f"{prompt_tokens / seconds['runtime']:.1f}", "-", "-", "info"]
    for name in ("create_completion", "Llama.generate"):
        ratio, whole = decode["runtime"] / decode[name], overall["runtime"] / overall[name]
        cells = [f"bare {name}", spread[name], f"{overall[name]:.1f}", f"{ratio:.3f}"]
        judged = [f">= {GOAL}", verdict(ratio)] if name == "create_completion" else ["-", "info"]
        gen_rows.append([*cells, f"{whole:.3f}", *judged])
    ms = seconds["create_completion"] * 1000
    rate = f"{prompt_tokens / seconds['create_completion']:.1f}"
    pp_rows.append(["bare create_completion", f"{ms:.1f}", rate, f"{goals['pp']:.3f}"])
    pp_rows[-1] += [f">= {GOAL}", verdict(goals["pp"])]
    header = ["Contender", "Decode tok/s (min-max)", "Overall tok/s", "Runtime/this decode"]
    title = (
        f"(b) Generation, {BUNDLE_QUANT} {BUNDLE_PROFILE} bundle: {count} tokens after a "
        f"{prompt_length}-token prompt, n_ctx {context}, median of {plan.repetitions}"
    )
    tables = [(title, [*header, "Runtime/this overall", "Goal", "Result"], gen_rows)]
    title = (
        f"(c) Prompt processing, {prompt_tokens}-token prompt, max_tokens=1: time to the first "
        f"piece, median of {plan.repetitions}"
    )
    header = ["Contender", "ms to first piece", "Prompt tok/s", "Runtime/this rate"]
    tables.append((title, [*header, "Goal", "Result"], pp_rows))
    return tables, goals, (decode["runtime"], weights), context


def bare_decode(path: Path, context: int, threads: int, plan: Plan, note) -> float:
    """Median decode tokens/s of the bare Llama.generate loop on ``path``."""
    llm = bare_llama(path, context, threads)
    runs = interleaved(
        {path.name: lambda: generate_run(llm, PROMPT, plan.tokens)}, plan.repetitions, note
    )
    llm.close()
    return statistics.median(r.decode_rate for r in runs[path.name])


def bench_bound(files: dict[str, Path], bundled: tuple, threads: int, plan, note, context: int):
    """(d) Decode tokens/s as a fraction of what memory bandwidth allows."""
    note(f"(d) measuring read bandwidth ({threads} threads, 1 GiB float32)")
    bandwidth = read_bandwidth(threads)
    rate, weights = bundled
    points = {BUNDLE_QUANT: (rate, weights, "Runtime.generate on the bundle, from (b)")}
    for name in ("Q8_0", "F16"):
        rate = bare_decode(
            files[name], context, threads, plan, lambda m, n=name: note(f"(d) {n}: {m}")
        )
        how = f"bare Llama.generate, median of {plan.repetitions}"
        points[name] = (rate, streamed_bytes(files[name]), how)
    rows = []
    for name, (rate, (weights, tied), how) in points.items():
        bound, mib = bandwidth / weights, f"{weights / 2**20:.1f}" + (" (tied)" if tied else "")
        rows.append([name, mib, f"{bound:.1f}", f"{rate:.1f}", f"{rate / bound:.0%}", how])
    title = (
        f"(d) Decode against the memory-bandwidth bound: read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s (numpy sum, max over 1 GiB, {threads} threads, best of 10); "
        "tied: no output.weight, so the embedding table is read whole as the output matrix"
    )
    header = ["Type", "MiB read/token", "Bound tok/s", "Decode tok/s", "Of bound", "Measured"]
    return [(title, header, rows)]


def run_all(args, plan: Plan, note) -> tuple[list, dict]:
    from packager.examples import build_example_bundle, make_example, source_fingerprint
    from packager.keys import generate_keypair

    cache = REPO / ".cache" / "bench-models" / source_fingerprint()
    cache.mkdir(parents=True, exist_ok=True)
    note("SmolLM2-135M-Instruct F16 source (made once, cached)")
    example = make_example("smollm2", cache)
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        work = Path(tmp)
        tables, files = bench_quality(example, work, plan, note)
        note(f"building the signed {BUNDLE_PROFILE} bundle ({BUNDLE_QUANT})")
        key, pub = generate_keypair(work / "keys")
        bundle = work / "smollm2.edgepkg"
        build_example_bundle(
            example, key, bundle, BUNDLE_PROFILE, progress=None, quant=BUNDLE_QUANT, measure=False
        )
        text = example.eval.read_text(encoding="utf-8")
        more, goals, bundled, context = bench_runtime(bundle, pub, args.threads, plan, text, note)
        tables += more
        tables += bench_bound(files, bundled, args.threads, plan, note, context)
    return tables, goals


def render_markdown(facts: list[str], tables: list[tuple], command: str) -> str:
    lines = ["## LLM (GGUF): quantization quality, runtime vs bare llama-cpp-python", ""]
    lines += [*facts, f"- Reproduce: `{command}`"]
    for title, header, rows in tables:
        lines += ["", f"{title}:", "", "| " + " | ".join(header) + " |"]
        lines += ["|" + "---|" * len(header), *["| " + " | ".join(row) + " |" for row in rows]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every benchmark, print the tables, and update docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 32 tokens: a smoke test")
    parser.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md alone")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama threads")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    llama_cpp = quiet_llama_cpp()

    from rich.console import Console
    from rich.table import Table

    plan = Plan(2, 32, 2) if args.quick else Plan(7, 128, None)
    console = Console()
    if not console.is_terminal:
        console.width = 160
    started, load = time.perf_counter(), os.getloadavg()[0]
    with progress_notes(console, started) as note:
        tables, goals = run_all(args, plan, note)
    minutes = (time.perf_counter() - started) / 60

    judged = [
        ("decode tokens/s, Runtime.generate / bare create_completion", goals["decode"]),
        ("prompt processing rate, Runtime.generate / bare create_completion", goals["pp"]),
    ]
    timing = (
        f"{plan.repetitions} interleaved rounds after one warm-up each, {plan.tokens} tokens, "
        "KV cache reset before every run; decode = tokens/s from the first token to the last"
    )
    facts = [
        f"Written by `scripts/bench_llm.py` on {host_line()}; llama-cpp-python "
        f"{llama_cpp.__version__}, {args.threads} threads everywhere; {minutes:.1f} min run, "
        f"1-min load average {load:.2f} at its start and {os.getloadavg()[0]:.2f} at its end "
        "(llama.cpp, on every core, slows down sharply when anything else runs).",
        "",
        *[f"- Goal: {what} >= {GOAL}: {value:.3f}, {verdict(value)}" for what, value in judged],
        "- Model: SmolLM2-135M-Instruct, F16 source quantized by the packager's GgufQuantize",
        "- Contenders: the bare calls drive the runtime's own engine object "
        "(`runtime.backend.engine`), interleaved with Runtime.generate: one llama.cpp model, "
        "one thread pool. The earlier 0.966 came from a second Llama on the same file, whose "
        "thread pool took turns with the runtime's on 2 cores",
        f"- Timing: {timing}"
        + (" (--quick: a smoke test, not for comparison)" if args.quick else ""),
    ]
    colours = {"PASS": "[green]PASS[/]", "MISS": "[bold red]MISS[/]", "info": "[cyan]info[/]"}
    for title, header, rows in tables:
        table = Table(*header, title=title)
        for row in rows:
            table.add_row(*[colours.get(cell, cell) for cell in row])
        console.print(table)
    for line in facts:
        console.print(line, markup=False, highlight=False)
    command = " ".join([".venv/bin/python scripts/bench_llm.py", *argv])
    if not args.no_write:
        write_section(
            "bench_llm", render_markdown(facts, tables, command.replace(" --no-write", ""))
        )
        console.print(f"updated {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
