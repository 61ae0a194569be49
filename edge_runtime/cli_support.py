"""Error rendering shared by the ``edgepack`` and ``edge-runtime`` CLIs.

Library code raises; this is the one place that turns an error into one red line and
an exit code (1 for errors, 2 for usage). ``--debug`` anywhere on the command line
shows the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


def run_cli(group: click.Group, handled: tuple[type[BaseException], ...]) -> None:
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        group.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.secho("aborted", fg="red", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except handled as exc:
        if debug:
            raise
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


def mqtt_options(env_prefix: str):
    """The broker-connection flags every MQTT program takes (settings: MqttSettings)."""
    options = [
        click.option("--username", help="MQTT user name."),
        click.option("--password", help=f"MQTT password (prefer {env_prefix}PASSWORD)."),
        click.option("--tls-ca", type=click.Path(path_type=Path), help="CA certificate (PEM)."),
        click.option(
            "--tls-cert", type=click.Path(path_type=Path), help="Client certificate (PEM)."
        ),
        click.option("--tls-key", type=click.Path(path_type=Path), help="Client key (PEM)."),
        click.option(
            "--mqtt-version", type=click.Choice(["5", "3.1.1"]), help="MQTT protocol version."
        ),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def stop_on_signals(stop) -> None:
    """SIGTERM and SIGINT set ``stop`` (a threading.Event); SIGUSR1 prints every thread's
    stack to stderr, for a process stuck in the field (``kill -USR1 <pid>``).

    The event is set from a short-lived thread, never in the handler itself: the handler
    runs on the main thread, which may be inside ``stop.wait()`` holding the event's lock,
    and setting it there would deadlock.
    """
    import faulthandler
    import signal
    import threading

    def handler(signum, frame) -> None:
        threading.Thread(target=stop.set, name="signal-stop", daemon=True).start()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
