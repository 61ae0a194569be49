"""Benchmark ``edge-runtime serve`` on this host, in one run, side by side.

Every figure is measured against real ``edge-runtime serve`` processes, with clients nobody
here wrote (tritonclient, the openai client) and a real load generator (wrk):

(a) MiniLM int8 (int8-dynamic-per-channel), one client, batch 1, sequence 128: served
    latency over in-process ``Runtime.run`` latency on the same bundle with the same
    threads (neither is given any: both cap the profile's at this host's CPUs), for REST
    with binary tensors (tritonclient.http), REST with JSON tensors and gRPC
    (tritonclient.grpc); interleaved blocks, medians (goal for binary REST and gRPC: <= 1.15).
(b) MiniLM int8, statically quantized (int8-static-mixed: the dynamic recipe is never
    batched, its results would depend on the batch), 16 wrk connections: throughput with
    dynamic batching (``--max-batch-size 8 --max-queue-delay-ms 2``) over ``--max-batch-size 1``;
    interleaved wrk runs, median of the per-round ratios (goal >= 1.3).
(c) SmolLM2 streaming chat (``/v1/chat/completions``, openai client, stream=True,
    temperature 0, a seed): decode tokens/s and time to the first token of serve against
    llama-cpp-python's own OpenAI server (``python -m llama_cpp.server``) on the same GGUF
    file with the same threads, n_ctx and n_batch; interleaved rounds, medians
    (goal: tokens/s ratio >= 0.97). Skipped when this build has no OpenAI routes.
(d) MiniLM int8 over REST: wrk's connections stepped up (1, 2, 4, ...) until p95 latency
    passes 100 ms; the highest requests/s with p95 <= 100 ms, and the first step past it.

Results print as tables (``--json``: the figures on stdout) and replace the ``bench_serve``
section of docs/benchmarks.md (``--no-write`` leaves it). Progress goes to stderr. Run from
the repository root:
``.venv/bin/python scripts/bench_serve.py [--quick] [--only a,b,c,d] [--json] [--no-write]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs as a plain script, installed package or not

import _bench_serve_procs as procs  # noqa: E402  (after the path is set)
import bench_onnx  # noqa: E402
from _bench_serve_chat import bench_chat  # noqa: E402
from bench_onnx import Figure  # noqa: E402
from benchdoc import DOC, host_line, markdown_tables, write_section  # noqa: E402

PROFILE = "x86-64-avx2"
DYNAMIC, STATIC = "int8-dynamic-per-channel", "int8-static-mixed"
# Batching "on": what the x86 profiles shipped before this benchmark turned it off there.
BATCHED = ("--max-batch-size", "8", "--max-queue-delay-ms", "2")
MODEL = "minilm"
LATENCY_GOAL = 1.15  # (a) served / in-process latency, binary REST and gRPC, at most
BATCHING_GOAL = 1.3  # (b) batching on / off throughput, at least
CONNECTIONS = 16  # (b)
P95_LIMIT_MS = 100.0  # (d)
QUEUE = "1024"  # deep enough that no step of (d) is refused: waiting shows as latency


@dataclass(frozen=True)
class Plan:
    """How much to measure in each part."""

    latency: bench_onnx.Plan  # (a): warm-up calls, rounds, calls per block
    rounds: int  # (b): wrk runs per server
    seconds: int  # (b), (d): seconds per wrk run
    ladder: tuple[int, ...]  # (d): wrk connection counts
    chats: int  # (c): timed chats per server, after one warm-up each
    max_tokens: int  # (c)


FULL = Plan(bench_onnx.Plan(10, 20, 25), 3, 10, (1, 2, 4, 8, 16, 32, 64, 128), 7, 64)
QUICK = Plan(bench_onnx.Plan(2, 2, 5), 1, 2, (1, 4), 1, 16)


class Servers:
    """The serve processes of the MiniLM parts, started once each, stopped at the end."""

    def __init__(self, folder: Path, pub: Path) -> None:
        self.folder, self.pub, self.running = folder, pub, {}
        self.bundles: dict[str, Path] = {}

    def get(self, key: str, recipe: str, *flags: str, grpc: bool = False) -> procs.Server:
        if key not in self.running:
            bundle = f"{MODEL}={self.bundles[recipe]}"
            flags = ("--queue-size", QUEUE, *flags)
            self.running[key] = procs.start_serve(
                f"serve-{key}", bundle, self.pub, self.folder, *flags, grpc=grpc
            )
        return self.running[key]

    def close(self) -> None:
        for server in self.running.values():
            server.stop()


def tensors(module, inputs: dict, output: str, binary: bool) -> tuple[list, list]:
    """tritonclient InferInputs and the requested output, built once (as a client would)."""
    from tritonclient.utils import np_to_triton_dtype

    found = []
    for name, value in inputs.items():
        tensor = module.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        if module.__name__.endswith("http"):
            tensor.set_data_from_numpy(value, binary_data=binary)
            wanted = module.InferRequestedOutput(output, binary_data=binary)
        else:
            tensor.set_data_from_numpy(value)
            wanted = module.InferRequestedOutput(output)
        found.append(tensor)
    return found, [wanted]


def bench_latency(servers: Servers, pub: Path, inputs: dict, plan: Plan, note) -> list[Figure]:
    """(a) One client: each protocol's latency over Runtime.run on the same bundle."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from edge_runtime import Runtime

    server = servers.get("dynamic", DYNAMIC, grpc=True)
    with Runtime.open(servers.bundles[DYNAMIC], pub) as runtime:
        output, threads = runtime.manifest.outputs[0].name, runtime.info()["threads"]
        http = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        calls = {
            "REST binary": (http, tensors(httpclient, inputs, output, True)),
            "REST JSON": (http, tensors(httpclient, inputs, output, False)),
            "gRPC": (grpc, tensors(grpcclient, inputs, output, True)),
        }
        expected = runtime.run(inputs)[output]
        for name, (client, (sent, wanted)) in calls.items():
            got = client.infer(MODEL, sent, outputs=wanted).as_numpy(output)
            if not np.allclose(got, expected, rtol=1e-4, atol=1e-5):
                raise RuntimeError(f"{name} answered other outputs than Runtime.run")
        contenders = {"in-process": lambda: runtime.run(inputs)}
        for name, (client, (sent, wanted)) in calls.items():
            contenders[name] = lambda c=client, s=sent, w=wanted: c.infer(MODEL, s, outputs=w)
        rounds = iter(range(1, plan.latency.rounds + 1))
        tick = lambda: note(f"(a) round {next(rounds)}/{plan.latency.rounds}")  # noqa: E731
        timing = bench_onnx.interleaved(contenders, plan.latency, tick)
        http.close()
        grpc.close()
    figures = []
    for name in calls:
        ratio, extra = timing.ratio(name, "in-process"), timing.difference_us(name, "in-process")
        judged = name != "REST JSON"
        figures.append(
            Figure(
                "a",
                f"MiniLM {DYNAMIC}, one client: {name} latency / in-process Runtime.run",
                f"{ratio:.3f}x ({extra / 1000:+.2f} ms)",
                f"<= {LATENCY_GOAL}" if judged else "-",
                ratio <= LATENCY_GOAL if judged else None,
                f"p50 {timing.p50_ms(name):.2f} ms served, {timing.p50_ms('in-process'):.2f} ms "
                f"in-process; batch 1, seq 128, {threads} engine threads in both",
            )
        )
    return figures


def infer_body(inputs: dict, output: str) -> tuple[bytes, dict[str, str]]:
    """The binary infer request tritonclient.http sends, for wrk to repeat."""
    import tritonclient.http as httpclient

    sent, wanted = tensors(httpclient, inputs, output, True)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(sent, wanted)
    headers = {"Content-Type": "application/octet-stream"}
    if json_size is not None:
        headers["Inference-Header-Content-Length"] = str(json_size)
    return body, headers


def infer_url(server: procs.Server, body: bytes, headers: dict[str, str]) -> str:
    """The infer URL, once it has answered the body with 200 (wrk counts, never checks)."""
    url = f"{server.url}/v2/models/{MODEL}/infer"
    status, answer = procs.call("POST", url, body, headers)
    if status != 200:
        raise RuntimeError(f"{server.name} answered {status} to the wrk body: {answer[:300]!r}")
    return url


def loaded(server: procs.Server, wrk: str, script: Path, connections: int, seconds: int):
    """One wrk run; with serve's mean rows per engine run over it (from /metrics)."""
    name = "edgepack_serve_batch_size"
    before = [procs.counter(server.url, f"{name}_{s}", MODEL) for s in ("sum", "count")]
    url = f"{server.url}/v2/models/{MODEL}/infer"
    result = procs.run_wrk(wrk, script, url, connections, seconds)
    after = [procs.counter(server.url, f"{name}_{s}", MODEL) for s in ("sum", "count")]
    runs = after[1] - before[1]
    return result, (after[0] - before[0]) / runs if runs else 0.0


def bench_batching(servers: Servers, wrk: str, body, plan: Plan, note) -> list[Figure]:
    """(b) 16 connections: the same static bundle batched and not, interleaved wrk runs."""
    contenders = {
        "on": servers.get("static-batched", STATIC, *BATCHED),
        "off": servers.get("static-unbatched", STATIC, "--max-batch-size", "1"),
    }
    script = procs.write_wrk_script(servers.folder, "infer-binary", *body)
    for server in contenders.values():
        infer_url(server, *body)
    runs: dict[str, list] = {name: [] for name in contenders}
    for index in range(plan.rounds):
        order = list(contenders) if index % 2 == 0 else list(contenders)[::-1]
        for name in order:
            note(f"(b) round {index + 1}/{plan.rounds}: batching {name}, {plan.seconds} s")
            runs[name].append(loaded(contenders[name], wrk, script, CONNECTIONS, plan.seconds))
    pairs = zip(runs["on"], runs["off"], strict=True)
    ratio = statistics.median(on.rate / off.rate for (on, _), (off, _) in pairs)

    def shown(name: str) -> str:
        found = runs[name]
        rate = statistics.median(result.rate for result, _ in found)
        p95 = statistics.median(result.p95_ms for result, _ in found)
        rows = statistics.median(rows for _, rows in found)
        errors = sum(result.errors for result, _ in found)
        return f"{name}: {rate:.1f} req/s, p95 {p95:.1f} ms, {rows:.2f} rows per run" + (
            f", {errors} errors" if errors else ""
        )

    setting = contenders["on"].serving_line()
    return [
        Figure(
            "b",
            f"MiniLM {STATIC}, {CONNECTIONS} clients: throughput, batching on / off",
            f"{ratio:.2f}x",
            f">= {BATCHING_GOAL}",
            ratio >= BATCHING_GOAL,
            f"{shown('on')}; {shown('off')}; on = {setting}; "
            f"wrk, binary REST, {plan.rounds} x {plan.seconds} s each, median of the "
            "per-round ratios",
        )
    ]


def bench_knee(server: procs.Server, label: str, wrk: str, body, plan: Plan, note):
    """(d) wrk's connections stepped up until p95 passes the limit; (figure, ladder rows)."""
    url = infer_url(server, *body)
    script = procs.write_wrk_script(server.log_path.parent, f"knee-{server.name}", *body)
    steps = []
    for connections in plan.ladder:
        note(f"(d) {label}: {connections} connections, {plan.seconds} s")
        steps.append(procs.run_wrk(wrk, script, url, connections, plan.seconds))
        if steps[-1].p95_ms > P95_LIMIT_MS:
            break
    within = [step for step in steps if step.p95_ms <= P95_LIMIT_MS]
    best = max(within, key=lambda step: step.rate) if within else None
    past = next((step for step in steps if step.p95_ms > P95_LIMIT_MS), None)
    value = "-" if best is None else f"{best.rate:.1f} req/s"
    where = (
        f"at {best.connections} connections (p95 {best.p95_ms:.1f} ms)"
        if best
        else "p95 over the limit at once"
    )
    after = (
        f"passes at {past.connections} connections: {past.rate:.1f} req/s, p95 {past.p95_ms:.1f} ms"
        if past
        else f"never passed, up to {plan.ladder[-1]} connections"
    )
    figure = Figure(
        "d",
        f"MiniLM {label}, REST binary: highest req/s with p95 <= {P95_LIMIT_MS:g} ms",
        value,
        "-",
        None,
        f"{where}; {after}; {server.serving_line()}; queue {QUEUE}",
    )
    rows = [
        [label, str(s.connections), f"{s.rate:.1f}", f"{s.p50_ms:.1f}", f"{s.p95_ms:.1f}"]
        + [f"{s.p99_ms:.1f}", str(s.errors)]
        for s in steps
    ]
    return figure, rows


def run_all(args, plan: Plan, note) -> tuple[list[Figure], list[list[str]], list[str]]:
    """Build what the chosen parts need and measure them; (figures, ladder rows, notes)."""
    from packager.examples import build_example_bundle, make_example, source_fingerprint
    from packager.keys import generate_keypair

    cache = REPO / ".cache" / "test-models" / source_fingerprint()  # the tests' cache
    cache.mkdir(parents=True, exist_ok=True)
    figures, ladder, notes = [], [], []
    wrk = procs.ensure_wrk(note) if {"b", "d"} & args.only else ""
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        key, pub = generate_keypair(work / "keys")
        servers = Servers(work / "servers", pub)
        try:
            if {"a", "b", "d"} & args.only:
                note("MiniLM example (exported once, cached)")
                minilm = make_example("minilm", cache)
                data, _ = bench_onnx.load_eval(minilm.eval)
                inputs = {name: value[:1].copy() for name, value in data.items()}
                recipes = ([DYNAMIC] if {"a", "d"} & args.only else []) + (
                    [STATIC] if {"b", "d"} & args.only else []
                )
                for recipe in recipes:
                    note(f"building MiniLM for {PROFILE} with {recipe}")
                    bundle = work / f"minilm-{recipe}.edgepkg"
                    build_example_bundle(minilm, key, bundle, PROFILE, recipe=recipe)
                    servers.bundles[recipe] = bundle
                body = infer_body(inputs, "sentence_embedding")
            if "a" in args.only:
                figures += bench_latency(servers, pub, inputs, plan, note)
            if "b" in args.only:
                figures += bench_batching(servers, wrk, body, plan, note)
            if "d" in args.only:
                knees = [(servers.get("dynamic", DYNAMIC, grpc="a" in args.only), DYNAMIC)]
                knees.append(
                    (servers.get("static-batched", STATIC, *BATCHED), f"{STATIC}, batched")
                )
                for server, label in knees:
                    figure, rows = bench_knee(server, label, wrk, body, plan, note)
                    figures.append(figure)
                    ladder += rows
        finally:
            servers.close()
        if "c" in args.only:
            note("SmolLM2 example (made once, cached)")
            smollm2 = make_example("smollm2", cache)
            note(f"building SmolLM2 for {PROFILE}")
            bundle = work / "smollm2.edgepkg"
            build_example_bundle(smollm2, key, bundle, PROFILE)
            found, said = bench_chat(bundle, pub, work / "chat", plan, note)
            figures += found
            notes += said
    return figures, ladder, notes


def facts(args, plan: Plan, minutes: float, loads: tuple[float, float]) -> list[str]:
    """The lines above the tables: host, engines, settings, timing."""
    import shutil
    import subprocess

    import llama_cpp
    import onnxruntime

    from edge_runtime.cpus import usable_cpus

    found = shutil.which("wrk")
    said = subprocess.run([found, "--version"], capture_output=True, text=True) if found else None
    wrk = said.stdout.split() if said else []
    timing = (
        f"(a) {plan.latency.warmup} warm-up calls, then {plan.latency.rounds} interleaved rounds "
        f"x {plan.latency.calls} calls per contender, ratio = median over rounds of the "
        f"per-round medians; (b) {plan.rounds} interleaved wrk runs of {plan.seconds} s per "
        f"server; (c) {plan.chats} interleaved chats of {plan.max_tokens} tokens per server "
        f"after one warm-up each; (d) {plan.seconds} s per step"
    )
    return [
        f"Written by `scripts/bench_serve.py` on {host_line()}; this process may use "
        f"{usable_cpus().describe()}; onnxruntime {onnxruntime.__version__}, llama-cpp-python "
        f"{llama_cpp.__version__}, wrk {wrk[1] if len(wrk) > 1 else '?'}; {minutes:.1f} min "
        f"run, 1-min load average {loads[0]:.2f} at its start and {loads[1]:.2f} at its end.",
        "",
        f"- Bundles: MiniLM and SmolLM2 examples built for {PROFILE}; every server is a real "
        "`edge-runtime serve` process on 127.0.0.1 without --threads (the profile's threads "
        "capped at the usable CPUs, as Runtime.open does), and the clients and wrk (one "
        "thread) run on the same cores",
        f"- Timing: {timing}"
        + (" (--quick: a smoke test, not for comparison)" if args.quick else ""),
    ]


def tables(figures: list[Figure], ladder: list[list[str]]) -> list[tuple]:
    header = ["Fig.", "Figure", "Measured", "Goal", "Result", "Detail"]
    rows = [[f.key, f.title, f.value, f.goal, f.verdict, f.detail] for f in figures]
    found = [("Figures", header, rows)]
    if ladder:
        header = ["Bundle", "Connections", "req/s", "p50 ms", "p95 ms", "p99 ms", "Errors"]
        found.append(("(d) wrk steps, REST binary, MiniLM", header, ladder))
    return found


def render_markdown(lines: list[str], notes: list[str], found: list[tuple], command) -> str:
    body = ["## Serving: edge-runtime serve against in-process runs and llama.cpp's server", ""]
    body += [*lines, *[f"- {note}" for note in notes], f"- Reproduce: `{command}`"]
    body += markdown_tables(found)
    return "\n".join(body) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure, print the tables, and update docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs: a smoke test")
    parser.add_argument("--only", default="a,b,c,d", help="parts to run, e.g. a,b (default all)")
    parser.add_argument("--seconds", type=int, help="seconds per wrk run in (b) and (d)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    parser.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md alone")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.only = {part.strip() for part in args.only.split(",") if part.strip()}
    if not args.only or args.only - set("abcd"):
        parser.error("--only takes parts among a, b, c, d, comma-separated (e.g. --only a,c)")
    plan = QUICK if args.quick else FULL
    if args.seconds is not None:
        if args.seconds < 1:
            parser.error("--seconds must be at least 1")
        plan = replace(plan, seconds=args.seconds)

    from rich.console import Console
    from rich.table import Table

    progress = Console(stderr=True)
    console = Console(stderr=args.json)
    for each in (progress, console):
        if not each.is_terminal:
            each.width = 160
    started, load = time.perf_counter(), os.getloadavg()[0]

    def note(message: str) -> None:
        line = f"[{time.perf_counter() - started:4.0f} s] {message}"
        progress.print(line, markup=False, highlight=False)

    figures, ladder, notes = run_all(args, plan, note)
    minutes = (time.perf_counter() - started) / 60
    lines = facts(args, plan, minutes, (load, os.getloadavg()[0]))
    found = tables(figures, ladder)
    colours = {"PASS": "[green]PASS[/]", "MISS": "[bold red]MISS[/]", "info": "[cyan]info[/]"}
    for title, header, rows in found:
        table = Table(*header, title=title)
        for row in rows:
            table.add_row(*[colours.get(cell, cell) for cell in row])
        console.print(table)
    for line in [*lines, *notes]:
        console.print(line, markup=False, highlight=False)
    flags = [flag for flag in argv if flag not in ("--no-write", "--json")]
    command = " ".join([".venv/bin/python scripts/bench_serve.py", *flags])
    if not args.no_write:
        write_section("bench_serve", render_markdown(lines, notes, found, command))
        console.print(f"updated {DOC.relative_to(REPO)}")
    if args.json:
        payload = {
            "host": lines[0],
            "figures": [asdict(f) | {"verdict": f.verdict} for f in figures],
            "ladder": [dict(zip(found[-1][1], row, strict=True)) for row in ladder],
            "notes": notes,
        }
        print(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
