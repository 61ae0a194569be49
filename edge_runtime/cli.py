"""``edge-runtime``: verify and run a bundle on the device (no network needed)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from .agent import AgentSettings
from .cli_options import settings_options
from .cli_support import (
    CliState,
    EdgeGroup,
    OptionError,
    cli_state,
    json_requested,
    run_cli,
    set_log_levels,
    stop_on_signals,
)
from .errors import EdgeRuntimeError
from .serve.settings import ServeSettings

THREADS_HELP = (
    "Thread count to use as given. Without it, the profile's count is capped at the CPUs "
    "this process may use (affinity, cgroup CPU quota)."
)
PUBKEY_HELP = "Ed25519 public key (PEM). Optional when $EDGEPACK_TRUSTED_KEYS names trusted keys."


def engine_options(command):
    """--threads and --providers: device-side overrides of what the manifest says."""
    command = click.option(
        "--providers",
        help="Comma-separated execution providers to use instead of the profile's, "
        "e.g. CUDAExecutionProvider,CPUExecutionProvider.",
    )(command)
    return click.option("--threads", type=int, help=THREADS_HELP)(command)


def _open(
    bundle: Path, pubkey: Path | None, threads: int | None = None, providers: str | None = None
):
    from .runtime import Runtime

    chosen = [p.strip() for p in providers.split(",") if p.strip()] if providers else None
    runtime = Runtime.open(bundle, pubkey, threads=threads, providers=chosen)
    _note_threads(runtime)
    return runtime


def _note_threads(runtime) -> None:
    """Print a note when the runtime gave the engine fewer threads than the profile asks
    for. Without -v the runtime's INFO line is not shown; its warnings always are."""
    choice = runtime.threads_used
    message = choice.message() if choice is not None else None
    if message is not None and message[0] < logging.WARNING and not cli_state().verbose:
        click.echo(f"note: {message[1]}", err=True)


def _configure_logging(state: CliState) -> None:
    """-v: also log what the runtime does (verification, providers) to stderr."""
    set_log_levels({"": logging.INFO if state.verbose else logging.WARNING})


@click.group(cls=EdgeGroup, configure_logging=_configure_logging)
def cli() -> None:
    """Verify edgepack bundles and run them offline.

    --debug, -v/--verbose and --json work before or after the command name.
    """


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--pubkey", type=click.Path(path_type=Path), help=PUBKEY_HELP)
@click.option(
    "--input",
    "input_path",
    type=click.Path(path_type=Path),
    help=".npz with one array per model input; other arrays (e.g. labels) are ignored, "
    "and a batch-1 model is fed the samples one at a time. Inputs the build made constant "
    "may be left out; a stateful bundle's samples are sequences [samples, steps, ...].",
)
@click.option(
    "--text",
    "texts",
    multiple=True,
    help="Text instead of --input (repeatable), for a bundle built with --tokenizer: prints "
    "each text's normalised embedding (a classifier's scores), all of it with --json.",
)
@click.option(
    "-o",
    "--output",
    "output_path",
    type=click.Path(path_type=Path),
    help=".npz to write the outputs to (required with --input; with --text, the "
    "embeddings as 'embeddings').",
)
@engine_options
def run(
    bundle: Path,
    pubkey: Path | None,
    input_path: Path | None,
    texts: tuple[str, ...],
    output_path: Path | None,
    threads: int | None,
    providers: str | None,
) -> None:
    """Run BUNDLE on the arrays in --input and write --output, or on --text."""
    import numpy as np

    from .errors import InputSignatureError
    from .eval_inputs import run_samples
    from .npz_file import read_npz

    if texts and input_path is not None:
        raise click.UsageError("give --input FILE.npz or --text TEXT, not both")
    if texts:
        _run_text(bundle, pubkey, list(texts), output_path, threads, providers)
        return
    if input_path is None:
        raise click.UsageError(
            "Missing option '--input' (or --text TEXT, for a bundle built with --tokenizer)."
        )
    if output_path is None:
        raise click.UsageError("Missing option '-o' / '--output' (the .npz to write).")
    # Every header is checked before anything is allocated: a crafted file is one line.
    inputs = read_npz(input_path, InputSignatureError, label=f"input file {input_path}")
    with _open(bundle, pubkey, threads, providers) as runtime:
        done = run_samples(runtime, inputs)
    outputs = done.outputs
    if done.ignored:
        click.echo(
            f"note: ignoring arrays that are not model inputs: {', '.join(done.ignored)}", err=True
        )
    if done.one_by_one:
        click.echo(
            f"note: the model takes batch 1; ran {done.samples} samples one at a time", err=True
        )
    np.savez(output_path, **outputs)
    if json_requested():
        shapes = {name: list(value.shape) for name, value in outputs.items()}
        click.echo(json.dumps({"output": str(output_path), "shapes": shapes}))
        return
    shapes = ", ".join(f"{name}{list(value.shape)}" for name, value in outputs.items())
    click.echo(f"wrote {output_path}: {shapes}")


SHOWN_VALUES = 6  # of each vector, without --json


def _run_text(bundle, pubkey, texts, output_path, threads, providers) -> None:
    """``run --text``: embeddings (or a text classifier's scores), one line per text."""
    import numpy as np

    with _open(bundle, pubkey, threads, providers) as runtime:
        batch = runtime.tokenize(texts)
        if runtime.manifest.text.task == "embedding":
            name, vectors = "embeddings", runtime.embed(batch)
        else:
            name = runtime.manifest.text.output
            vectors = runtime.run(batch.feeds)[name]
    if output_path is not None:
        np.savez(output_path, **{name: vectors})
    if json_requested():
        report = {name: vectors.tolist(), "tokens": batch.lengths}
        click.echo(json.dumps({**report, "output": output_path and str(output_path)}))
        return
    for text, vector, tokens in zip(texts, vectors, batch.lengths, strict=True):
        shown = " ".join(f"{value:+.4f}" for value in vector[:SHOWN_VALUES])
        more = " ..." if len(vector) > SHOWN_VALUES else ""
        label = text if len(text) <= 40 else text[:37] + "..."
        click.echo(f"{label!r} ({tokens} tokens): [{shown}{more}] dim {len(vector)}")
    if output_path is not None:
        click.echo(f"wrote {output_path}: {name}{list(vectors.shape)}")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--pubkey", type=click.Path(path_type=Path), help=PUBKEY_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@engine_options
def selftest(
    bundle: Path, pubkey: Path | None, as_json: bool, threads: int | None, providers: str | None
) -> None:
    """Run BUNDLE's self-test vectors; exit 0 when they match the build host's reference."""
    from dataclasses import asdict

    with _open(bundle, pubkey, threads, providers) as runtime:
        report = runtime.selftest()
    if as_json:
        click.echo(json.dumps(asdict(report), indent=2))
    else:
        verdict = click.style(
            "PASS" if report.passed else "FAIL", fg="green" if report.passed else "red"
        )
        if report.expected_tokens is not None:
            click.echo(
                f"self-test {verdict}: {report.matched_tokens} of {report.expected_tokens} "
                "greedy tokens match the build host's"
            )
        else:
            click.echo(
                f"self-test {verdict}: {report.vectors} vectors, max abs error "
                f"{report.max_abs_error:.3g} (allowed {report.atol:.3g}), min cosine "
                f"{report.min_cosine:.6f} (needs {report.required_cosine:.6f})"
            )
        for failure in report.failures:
            click.echo(f"  {failure}")
    raise SystemExit(0 if report.passed else 1)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--pubkey", type=click.Path(path_type=Path), help=PUBKEY_HELP)
@click.option("--load", is_flag=True, help="Also load the model and show the providers in use.")
@engine_options
def info(
    bundle: Path, pubkey: Path | None, load: bool, threads: int | None, providers: str | None
) -> None:
    """Show what BUNDLE holds, after verifying its signature and hashes."""
    from .bundle import verify_bundle
    from .summary import summary_json, summary_text

    if load:
        with _open(bundle, pubkey, threads, providers) as runtime:
            facts = runtime.info()
        click.echo(json.dumps(facts, indent=2))
        return
    verified = verify_bundle(bundle, pubkey)
    if json_requested():  # the signer and the manifest as signed
        click.echo(summary_json(verified.manifest_bytes, verified.key_id))
    else:
        click.echo(summary_text(verified.manifest, verified.key_id))


@cli.command("systemd-unit", context_settings={"ignore_unknown_options": True})
@click.argument("serve_args", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option(
    "--user",
    default="edgepack",
    show_default=True,
    help="The dedicated system user the service runs as (create it first).",
)
@click.option(
    "--watchdog-sec",
    default=30,
    show_default=True,
    type=click.IntRange(min=2),
    help="systemd restarts the service when its serving loop stops answering this long.",
)
@click.option(
    "--executable",
    type=click.Path(exists=True, dir_okay=False, resolve_path=True, path_type=Path),
    help="The edge-runtime program to run; default: this one.",
)
def systemd_unit(
    serve_args: tuple[str, ...], user: str, watchdog_sec: int, executable: Path | None
) -> None:
    """Print a systemd unit running `edge-runtime serve SERVE_ARGS...` (docs/serve-systemd.md).

    SERVE_ARGS are the serve command's bundles and options, e.g.
    `edge-runtime systemd-unit /opt/models/digits.edgepkg --pubkey /etc/edgepack/pub.pem
    --port 8000 > /etc/systemd/system/edge-runtime.service`. Relative paths that exist
    here are made absolute (systemd starts the service in /). Put serve options that
    systemd-unit also takes (--user, -v, --json, ...) after `--`.
    """
    from .serve.systemd import unit_file

    program = [str(executable)] if executable else _this_program()
    words = [_absolute(word) for word in serve_args]
    click.echo(unit_file([*program, "serve", *words], user=user, watchdog_s=watchdog_sec), nl=False)


# Files a serve argument may name: a relative one that does not exist here is a mistake.
_FILE_SUFFIXES = {".edgepkg", ".pem", ".key", ".crt", ".yaml", ".yml", ".json"}


def _absolute(word: str) -> str:
    """``word`` with a relative path made absolute (also after ``NAME=`` or ``--opt=``)."""
    head, sep, path = word.rpartition("=")
    if not path or path.startswith("-") or "://" in path or Path(path).is_absolute():
        return word
    if Path(path).exists():
        return f"{head}{sep}{Path(path).resolve()}"
    if Path(path).suffix in _FILE_SUFFIXES:
        raise OptionError(
            f"{path} does not exist here: give the path the device will have, absolute "
            "(systemd starts the service in /)"
        )
    return word


def _this_program() -> list[str]:
    """How to start this edge-runtime again: its console script, else this Python."""
    import shutil
    import sys

    script = shutil.which("edge-runtime")
    if script:
        return [str(Path(script).resolve())]
    return [sys.executable, "-m", "edge_runtime.cli"]


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--pubkey", type=click.Path(path_type=Path), help=PUBKEY_HELP)
@click.option("--chat", is_flag=True, help="Send PROMPT as a user message through the template.")
@click.option("--system", help="System message (with --chat).")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--temperature",
    default=0.7,
    show_default=True,
    type=click.FloatRange(min=0),
    help="0 = greedy.",
)
@click.option("--seed", type=int, help="Sampling seed, for repeatable output.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--threads", type=int, help=THREADS_HELP)
@click.option("--gpu-layers", type=int, help="Layers to offload to the GPU (-1 = all).")
@click.option("--context-length", type=click.IntRange(min=16), help="Override the context.")
def generate(
    bundle: Path,
    prompt: str,
    pubkey: Path | None,
    chat: bool,
    system: str | None,
    max_tokens: int,
    temperature: float,
    seed: int | None,
    stop: tuple[str, ...],
    threads: int | None,
    gpu_layers: int | None,
    context_length: int | None,
) -> None:
    """Stream a completion of PROMPT from a language-model BUNDLE; Ctrl-C stops it."""
    import signal
    import sys

    # A parent that ignores SIGINT (a background job, some supervisors) passes that on, and
    # Python then never raises KeyboardInterrupt: Ctrl-C or `kill -INT` would not stop us.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    from .runtime import Runtime

    options = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    options["stop"] = list(stop)
    with Runtime.open(
        bundle, pubkey, threads=threads, gpu_layers=gpu_layers, context_length=context_length
    ) as runtime:
        if chat:
            messages = [{"role": "system", "content": system}] if system else []
            stream = runtime.chat([*messages, {"role": "user", "content": prompt}], **options)
        else:
            stream = runtime.generate(prompt, **options)
        _note_threads(runtime)  # once the bundle is known to generate: else one error line
        as_json = json_requested()
        pieces = []
        try:
            for piece in stream:
                if as_json:  # one object at the end, for a script
                    pieces.append(piece)
                    continue
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            click.echo(f"[stopped after {stream.completion_tokens} tokens]", err=True)
            raise SystemExit(130) from None
    if as_json:
        report = {"text": "".join(pieces), "completion_tokens": stream.completion_tokens}
        click.echo(json.dumps({**report, "finish_reason": stream.finish_reason}))
        return
    sys.stdout.write("\n")
    click.echo(f"[{stream.completion_tokens} tokens, finish: {stream.finish_reason}]", err=True)


@cli.command()
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    help="YAML or JSON file of settings (same names as the flags, with _).",
)
@settings_options(AgentSettings, exclude=("bundle",))
def agent(config_file: Path | None, **flags) -> None:
    """Run BUNDLE and report health and metrics to the fleet over MQTT.

    Every option can also come from --config FILE or an EDGE_RUNTIME_<NAME> environment
    variable (e.g. EDGE_RUNTIME_BROKER); flags win over the environment, which wins over
    the file.
    """
    import threading

    from .agent import ENV_PREFIX, run_agent
    from .settings import load_settings

    settings = load_settings(AgentSettings, ENV_PREFIX, config_file, flags)
    logging.getLogger("edge_runtime").setLevel(logging.INFO)  # an agent narrates its state
    stop = threading.Event()
    stop_on_signals(stop)
    raise SystemExit(run_agent(settings, stop))


@cli.command()
@click.argument("bundles", nargs=-1, metavar="BUNDLE|NAME=BUNDLE...")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    help="YAML or JSON file of settings (same names as the flags, with _).",
)
@settings_options(ServeSettings, exclude=("bundles",))
def serve(bundles: tuple[str, ...], config_file: Path | None, **flags) -> None:
    """Serve bundles over HTTP until SIGTERM: the Open Inference Protocol v2 (KServe,
    Triton) for tensor models, with /metrics for Prometheus (see docs/serve.md).

    Each bundle is verified before it is loaded and served under its manifest name, or
    as NAME=BUNDLE. /v2/health/ready answers 200 once every model is loaded and
    self-tested. With --fleet and --device-id it reports to the fleet as `agent` does.
    Every option can also come from --config FILE or EDGE_RUNTIME_<NAME> variables.
    """
    import threading

    from .agent import ENV_PREFIX
    from .serve.server import run_serve
    from .settings import load_settings

    if bundles:
        flags["bundles"] = list(bundles)
    elif config_file is None:
        from .cli_support import OptionError

        raise OptionError("give at least one BUNDLE (or NAME=BUNDLE) to serve; see --help")
    settings = load_settings(ServeSettings, ENV_PREFIX, config_file, flags)
    logging.getLogger("edge_runtime").setLevel(logging.INFO)  # a server narrates its state
    stop = threading.Event()
    stop_on_signals(stop)
    raise SystemExit(run_serve(settings, stop, serve_extensions(settings)))


def serve_extensions(settings) -> list:
    """What runs beside the HTTP server: systemd's notifications always (they do nothing
    outside systemd), the OpenAI API's routes, and the gRPC service with --grpc-port."""
    from .serve.extensions import GrpcFrontEnd, OpenAiFrontEnd, SystemdNotifier
    from .serve.server import read_api_key

    extensions = [SystemdNotifier(), OpenAiFrontEnd(settings)]
    if settings.grpc_port is not None:
        extensions.append(GrpcFrontEnd(settings, read_api_key(settings)))
    return extensions


def main() -> None:
    run_cli(cli, (EdgeRuntimeError,))


if __name__ == "__main__":
    main()
