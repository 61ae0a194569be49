"""Benchmark edgepack's offline delivery of the device runtime, in one run on this host.

(a) Size and build/install time of the PyInstaller one-file and one-folder executables
    (``freeze_runtime``) and of a venv installed offline from an x86-64-avx2 MiniLM bundle's
    wheelhouse (``scripts/install-on-device.sh``).
(b) Cold start of whole ``edge-runtime --help`` / ``run`` processes (verify, extract, load,
    one inference), interleaved rounds; self-tests and outputs must agree across the forms.
(c) The raspberry-pi-4 MiniLM bundle installed offline and timed in the emulated arm64 system
    (``scripts/arm64-rootfs.sh``, qemu-user), next to the same bundle on this host.

Results print as tables and replace the ``bench_offline`` section of docs/benchmarks.md.
Run from the repository root, as root for (c):
``.venv/bin/python scripts/bench_offline.py [--skip-freeze] [--skip-arm64] [--no-write]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs as a plain script, installed package or not

from benchdoc import DOC, host_line, write_section  # noqa: E402  (after the path is set)

HOST_PROFILE, PI_PROFILE = "x86-64-avx2", "raspberry-pi-4"
ROUNDS = 7  # timed rounds per cold-start case, after one warm-up per form
LATENCY_RUNS = 20  # timed Runtime.run calls in (c), after 3 warm-up calls
PROCESSES = 3  # timed whole `edge-runtime run` processes in (c), after one warm-up
ROOTFS = REPO / "scripts" / "arm64-rootfs.sh"
INSTALL = REPO / "scripts" / "install-on-device.sh"
EMULATED = (
    "emulated (qemu-user, cortex-a72 model, on x86): says nothing about a real Raspberry Pi's speed"
)
# Runs in the emulated system (with its python3) and on the host, so both sides are measured
# by the same code: optional offline install, then in-process latency, then whole processes.
DRIVER = r"""
import json, platform, statistics, subprocess, sys, time


def timed(command):
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{command[:2]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - started, done.stdout


def latency(bundle, pub, inputs, runs):
    import numpy as np
    from edge_runtime.runtime import Runtime

    with np.load(inputs) as data:
        arrays = {key: data[key] for key in data.files}
    started = time.perf_counter()
    with Runtime.open(bundle, pub) as runtime:
        times = [time.perf_counter() - started]  # load, then 3 warm-up and the timed calls
        for _ in range(3 + runs):
            started = time.perf_counter()
            runtime.run(arrays)
            times.append(time.perf_counter() - started)
    load, times = times[0], times[4:]
    p95 = statistics.quantiles(times, n=20, method="inclusive")[18]
    return {"load_s": load, "p50_ms": statistics.median(times) * 1e3, "p95_ms": p95 * 1e3}


if sys.argv[1] == "latency":
    print(json.dumps(latency(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))))
    sys.exit()
folder, bundle, pub, inputs, bindir, install, runs, processes = sys.argv[1:9]
result = {"machine": platform.machine()}
if install == "1":
    wheels, venv = bundle[: -len(".edgepkg")] + ".wheels", bindir[: -len("/bin")]
    command = ["bash", wheels + "/install.sh", bundle, "--pubkey", pub, "--venv", venv]
    result["install_s"] = timed(command)[0]
out = timed([bindir + "/python", __file__, "latency", bundle, pub, inputs, runs])[1]
result.update(json.loads(out.splitlines()[-1]))
output = f"{folder}/out-{result['machine']}.npz"
run = [bindir + "/edge-runtime", "run", bundle, "--pubkey", pub, "--input", inputs]
timed([*run, "--output", output])  # warm-up
result["process_s"] = [timed([*run, "--output", output])[0] for _ in range(int(processes))]
print("RESULT " + json.dumps(result))
"""


def sh(command: list, env: dict | None = None, timeout: float = 1800) -> tuple[float, str]:
    """Run ``command``; return (wall seconds, stdout). Raises RuntimeError on failure."""
    started, command = time.perf_counter(), [str(part) for part in command]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    seconds, tail = time.perf_counter() - started, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({done.returncode}):\n{tail}")
    return seconds, done.stdout


def tree_size(path: Path) -> tuple[int, int]:
    """(bytes, files) of a file or folder; symlinks are skipped."""
    if path.is_file():
        return path.stat().st_size, 1
    files = [item for item in path.rglob("*") if item.is_file() and not item.is_symlink()]
    return sum(item.stat().st_size for item in files), len(files)


def busy() -> list[str]:
    """Other heavy jobs on this machine (pytest, bench_*), this process's ancestors left out."""
    mine, pid = set(), os.getpid()
    while pid > 1 and pid not in mine:
        mine.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    pattern = "pytest|bench_|qemu-(aarch64|binfmt)"  # another session's emulation too
    found = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if int(line.split()[0]) not in mine]


def wait_quiet(console, phase: str, noisy: list[str], limit: float = 900) -> None:
    """Wait (30 s polls, up to ``limit``) until no other heavy job runs and the machine is
    near idle (other processes below 0.2 cores over 5 s); note the phase if that never comes."""
    deadline = time.monotonic() + limit
    while True:
        before = cpu_seconds()
        time.sleep(5)
        machine, own = (after - then for after, then in zip(cpu_seconds(), before, strict=True))
        others = busy() or ([f"{(machine - own) / 5:.2f} cores busy"] * (machine - own > 1))
        if not others:
            return
        if time.monotonic() > deadline:
            noisy.append(f"{phase} ({others[0][:80]})")
            return
        console.log(f"{phase}: waiting for other work to end: {others[0][:100]}")
        time.sleep(25)


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds busy on the whole machine, used by this process and its waited children)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    machine = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, io
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return machine, sum(u.ru_utime + u.ru_stime for u in usage)


@contextlib.contextmanager
def phase(console, name: str, log: dict):
    """Wait until no other heavy job runs, then record how many cores others use meanwhile."""
    wait_quiet(console, name, log["noisy"])
    before, started = cpu_seconds(), time.perf_counter()
    yield
    machine, own = (after - then for after, then in zip(cpu_seconds(), before, strict=True))
    log["others"][name] = max(0.0, machine - own) / (time.perf_counter() - started)


def first_sample(eval_path: Path, out: Path) -> dict:
    """Write the eval .npz's first sample (batch of one, no labels) to ``out``; return it."""
    import numpy as np

    with np.load(eval_path, allow_pickle=False) as data:
        inputs = {key: data[key][:1] for key in data.files if key != "labels"}
    np.savez(out, **inputs)
    return inputs


def max_diff(produced: Path, expected: dict) -> float:
    import numpy as np

    with np.load(produced) as data:
        return max(float(np.abs(data[name] - value).max()) for name, value in expected.items())


def build_bundles(work: Path, console, arm64: bool) -> dict:
    """Keys, examples and the bundles, with the project's own library calls."""
    from edge_runtime import Runtime
    from packager.examples import build_example_bundle, make_example, source_fingerprint
    from packager.keys import generate_keypair

    cache = REPO / ".cache" / "bench-models" / source_fingerprint()
    cache.mkdir(parents=True, exist_ok=True)
    key, pub = generate_keypair(work / "keys")
    console.log("examples: MiniLM and the digits CNN (cached after the first run)")
    examples = {
        "MiniLM": make_example("minilm", cache),
        "digits": make_example("digits-cnn", cache),
    }
    models, threads = {}, {}
    for name, example in examples.items():
        console.log(f"building {name} for {HOST_PROFILE} with its wheelhouse")
        output = work / HOST_PROFILE / f"{name.lower()}.edgepkg"
        built = build_example_bundle(example, key, output, HOST_PROFILE, with_wheels=True)
        inputs = first_sample(example.eval, work / f"in-{name.lower()}.npz")
        with Runtime.open(output, pub) as runtime:  # the in-process reference outputs
            expected = runtime.run(inputs)
        wheels = built.manifest.wheelhouse.wheels
        threads[HOST_PROFILE] = built.manifest.backend.intra_op_threads
        models[name] = {
            "bundle": output,
            "input": work / f"in-{name.lower()}.npz",
            "expected": expected,
            "note": f"{name} {built.manifest.quantization.chosen}, "
            f"{output.stat().st_size / 1e6:.1f} MB bundle + {len(wheels)} wheels "
            f"({sum(w.size for w in wheels) / 1e6:.1f} MB)",
        }
    pi = None
    if arm64:
        console.log(f"building MiniLM for {PI_PROFILE} with its wheelhouse")
        folder = work / "arm64"
        folder.mkdir()
        output = folder / "minilm-pi4.edgepkg"
        result = build_example_bundle(examples["MiniLM"], key, output, PI_PROFILE, with_wheels=True)
        pi, threads[PI_PROFILE] = output, result.manifest.backend.intra_op_threads
        shutil.copy(pub, folder / "edgepack.pub")
        first_sample(examples["MiniLM"].eval, folder / "in.npz")
    return {"pub": pub, "models": models, "pi_bundle": pi, "threads": threads}


def make_forms(work: Path, built: dict, skip_freeze: bool, console) -> dict:
    """form -> {exe, seconds, bytes, files, note}: frozen executables and the offline venv."""
    forms = {}
    if not skip_freeze:
        from packager.freeze import freeze_runtime
        from packager.profiles import load_profile

        frozen = freeze_runtime(
            load_profile(HOST_PROFILE), ["onnx"], work / "frozen", progress=console.log
        )
        unpack = {"onefile": "unpacks to /tmp on every start", "onedir": "nothing to unpack"}
        for item in frozen:
            top = item.executable if item.form == "onefile" else item.executable.parent
            size, files = tree_size(top)
            note = f"interpreter + stdlib inside; {unpack[item.form]}"
            forms[item.form] = dict(exe=item.executable, seconds=item.seconds, bytes=size)
            forms[item.form].update(files=files, step="PyInstaller", note=note)
    console.log("installing a venv offline from the MiniLM bundle's wheelhouse")
    venv = work / "venv"
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if ".venv" not in p)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | {"PATH": path}
    bundle = built["models"]["MiniLM"]["bundle"]
    seconds, _ = sh(["bash", INSTALL, bundle, "--pubkey", built["pub"], "--venv", venv], env)
    size, files = tree_size(venv)
    note = "the base python3.11 and its stdlib stay outside the venv: not counted"
    forms["venv"] = dict(exe=venv / "bin" / "edge-runtime", seconds=seconds, bytes=size)
    forms["venv"].update(files=files, step="install-on-device.sh (verifies too)", note=note)
    return forms


def cold_starts(forms: dict, built: dict, work: Path, console) -> tuple[dict, dict]:
    """Interleaved whole-process timings per case and form; then self-tests and outputs."""
    pub, models = built["pub"], built["models"]
    cases = {"--help": lambda form, exe: [exe, "--help"]}
    for name, model in models.items():
        cases[f"run {name}"] = lambda form, exe, name=name, model=model: [
            *(exe, "run", model["bundle"], "--pubkey", pub, "--input", model["input"]),
            *("--output", work / f"out-{form}-{name}.npz"),
        ]
    times = {}
    for case, command in cases.items():
        console.log(f"cold start, {case}: 1 warm-up + {ROUNDS} interleaved rounds")
        commands = {form: command(form, info["exe"]) for form, info in forms.items()}
        for line in commands.values():  # warm-up: page cache, onefile's first unpack
            sh(line, env={})
        names, times[case] = list(commands), {form: [] for form in commands}
        for index in range(ROUNDS):
            shift = index % len(names)
            for form in names[shift:] + names[:shift]:
                times[case][form].append(sh(commands[form], env={})[0])
    checks = {}
    for form, info in forms.items():
        row = []
        for name, model in models.items():
            _, out = sh([info["exe"], "selftest", model["bundle"], "--pubkey", pub], env={})
            diff = max_diff(work / f"out-{form}-{name}.npz", model["expected"])
            row.append(("PASS" if "self-test PASS" in out else "FAIL", diff))
        checks[form] = row
    return times, checks


def bench_arm64(folder: Path, bundle: Path, console) -> dict:
    """Install and time the raspberry-pi-4 bundle in the emulated system, then on this host."""
    sh([ROOTFS, "create"])
    driver = folder / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    args = [folder, bundle, folder / "edgepack.pub", folder / "in.npz"]
    counts = [LATENCY_RUNS, PROCESSES]
    console.log("emulated arm64: offline install, latency, whole processes (several minutes)")
    env = {**os.environ, "ARM64_BIND": str(folder)}
    inside = [ROOTFS, "run", "--", "python3", driver, *args, "/tmp/venv/bin", "1", *counts]
    results = {"emulated": sh(inside, env, timeout=3600)[1]}
    console.log("the same bundle on this host, with the project's venv")
    host = [sys.executable, driver, *args, Path(sys.executable).parent, "0", *counts]
    results["host"] = sh(host)[1]
    parsed = {
        where: json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
        for where, out in results.items()
    }
    import numpy as np

    with np.load(folder / "out-x86_64.npz") as host_out:
        expected = {name: host_out[name] for name in host_out.files}
    parsed["diff"] = max_diff(folder / f"out-{parsed['emulated']['machine']}.npz", expected)
    return parsed


def result_tables(forms: dict, times: dict, checks: dict, arm: dict | None, models) -> list:
    """(title, header, rows) tables, shared by the console and the docs."""
    rows = [
        [form, info["step"], f"{info['seconds']:.1f}", f"{info['bytes'] / 1e6:.1f}"]
        + [f"{info['files']:,}", info["note"]]
        for form, info in forms.items()
    ]
    header = ["Form", "Made by", "Seconds", "MB on disk", "Files", "Note"]
    tables = [("Size on disk, and build or install time", header, rows)]
    shown = lambda t: f"{statistics.median(t):.2f} / {min(t):.2f}"  # noqa: E731
    rows = [[case, *[shown(times[case][form]) for form in forms]] for case in times]
    title = f"Cold start, whole process, seconds: median / min of {ROUNDS} (warm page cache)"
    tables.append((title, ["Command", *forms], rows))
    header = ["Form", *[f"{name}: selftest, max abs diff" for name in models]]
    rows = [[form, *[f"{ok}, {diff:.2g}" for ok, diff in checks[form]]] for form in forms]
    tables.append(("Self-tests, and outputs against the in-process runtime", header, rows))
    if arm:
        emulated, host = arm["emulated"], arm["host"]

        def row(label: str, key: str, unit: str, digits: int = 2) -> list[str]:
            a = statistics.median(emulated[key]) if key == "process_s" else emulated[key]
            b = statistics.median(host[key]) if key == "process_s" else host[key]
            return [label, f"{a:.{digits}f} {unit}", f"{b:.{digits}f} {unit}", f"{a / b:.1f}x"]

        rows = [
            ["offline install (install.sh)", f"{emulated['install_s']:.1f} s", "-", "-"],
            row("Runtime.open (verify, extract, load)", "load_s", "s"),
            row(f"Runtime.run p50 ({LATENCY_RUNS} calls)", "p50_ms", "ms", 1),
            row("Runtime.run p95", "p95_ms", "ms", 1),
            row(f"edge-runtime run process, median of {PROCESSES}", "process_s", "s"),
            ["outputs, max abs diff vs host", f"{arm['diff']:.2g}", "-", "-"],
        ]
        header = ["MiniLM raspberry-pi-4 bundle", "arm64 emulated", "x86 host", "ratio"]
        tables.append((f"arm64 {EMULATED}", header, rows))
    return tables


def render_markdown(facts: dict, tables: list, notes: list[str], command: str) -> str:
    lines = [
        "## Offline delivery: frozen executables, offline venv, emulated arm64",
        "",
        f"Written by `scripts/bench_offline.py` on {facts['date']}.",
        "",
        f"- Host: {host_line()}; onnxruntime {facts['onnxruntime']}, "
        f"PyInstaller {facts['pyinstaller']}",
        *[f"- {note}" for note in notes],
        f"- Reproduce: `{command}`",
    ]
    for title, header, rows in tables:
        lines += ["", f"{title}:", "", "| " + " | ".join(header) + " |"]
        lines += ["|" + "---|" * len(header), *["| " + " | ".join(row) + " |" for row in rows]]
    return "\n".join(lines) + "\n"


def print_tables(console, tables: list, notes: list[str]) -> None:
    from rich.table import Table

    console.print(f"[bold]{host_line()}[/]")
    for title, header, rows in tables:
        table = Table(*header, title=title)
        for row in rows:
            table.add_row(*[cell.replace("PASS", "[green]PASS[/]") for cell in row])
        console.print(table)
    for note in notes:
        console.print(f"[dim]{note}[/]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-freeze", action="store_true", help="no PyInstaller executables")
    parser.add_argument("--skip-arm64", action="store_true", help="no emulated arm64 part")
    parser.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md alone")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    import onnxruntime
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console.width = 160
    skipped, noisy = ["arm64 part (--skip-arm64)"] * args.skip_arm64, []
    log = {"noisy": noisy, "others": {}}
    arm64 = not args.skip_arm64 and os.geteuid() == 0
    if not args.skip_arm64 and not arm64:
        skipped.append("arm64 part (needs root for the chroot)")
    try:
        import PyInstaller

        pyinstaller = PyInstaller.__version__
    except ImportError:
        pyinstaller = "not installed"
    if args.skip_freeze or pyinstaller == "not installed":
        skipped.append(
            f"frozen executables ({'--skip-freeze' if args.skip_freeze else pyinstaller})"
        )
        args.skip_freeze = True

    with tempfile.TemporaryDirectory(prefix="offline-bench-") as tmp:
        work = Path(tmp)
        with phase(console, "bundles", log):
            built = build_bundles(work, console, arm64)
        with phase(console, "freeze and install", log):
            forms = make_forms(work, built, args.skip_freeze, console)
        with phase(console, "cold start", log):
            times, checks = cold_starts(forms, built, work, console)
        arm = None
        if arm64:
            try:
                with phase(console, "arm64", log):
                    arm = bench_arm64(work / "arm64", built["pi_bundle"], console)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                console.print(f"[red]arm64 part failed:[/] {exc}")
                skipped.append(f"arm64 part (failed: {str(exc).splitlines()[0][:120]})")

    models = built["models"]
    notes = [
        "Bundles (x86-64-avx2, wheelhouse beside): "
        + "; ".join(model["note"] for model in models.values()),
        "Cold start: whole processes in an empty environment (`env -i`, every form), "
        f"1 warm-up per form, then {ROUNDS} rounds whose order rotates; `run` = verify the "
        "signature and hashes, extract, load the model, one inference, write the .npz. "
        "The page cache is warm after the warm-up (caches are not dropped: that cannot be "
        "done fairly here), so a first start after boot, reading from storage, is slower",
        "Intra-op threads: each bundle's own ("
        + ", ".join(f"{name}: {count}" for name, count in built["threads"].items())
        + f") on this {os.cpu_count()}-core machine",
    ]
    if arm:
        notes.append(
            f"arm64: {EMULATED}. Debian bookworm arm64 chroot, no network; ratio = emulated / "
            f"host for the same bundle, same code; Runtime.run after 3 warm-up calls; one pass, "
            "so read the emulated figures as orders of magnitude"
        )
    notes.append(
        "Cores used by other processes meanwhile (machine busy time minus this run's own, "
        "per wall second; above 0.1 means disturbed figures): "
        + ", ".join(f"{name} {cores:.2f}" for name, cores in log["others"].items())
    )
    if skipped:
        notes.append("Skipped: " + "; ".join(skipped))
    if noisy:
        notes.append("Other heavy jobs still ran during: " + "; ".join(noisy))
    facts = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "onnxruntime": onnxruntime.__version__,
        "pyinstaller": pyinstaller,
    }
    tables = result_tables(forms, times, checks, arm, models)
    print_tables(console, tables, notes)
    flags = [flag for flag in argv if flag != "--no-write"]
    command = " ".join([".venv/bin/python scripts/bench_offline.py", *flags])
    if not args.no_write:
        write_section("bench_offline", render_markdown(facts, tables, notes, command))
        console.print(f"updated {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
