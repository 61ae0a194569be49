"""``edge-collector``: store and show a fleet's telemetry."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from edge_runtime.cli_options import settings_options
from edge_runtime.cli_support import CliState, EdgeGroup, json_requested, run_cli, set_log_levels
from edge_runtime.errors import EdgeRuntimeError

from .errors import CollectorError
from .settings import CollectorSettings


def _configure_logging(state: CliState) -> None:
    """-v: log every connection change and batch."""
    # without -v, the embedded broker would narrate every packet at INFO
    quiet = logging.DEBUG if state.verbose else logging.WARNING
    levels = {"": logging.DEBUG if state.verbose else logging.INFO}
    set_log_levels(
        {**levels, "amqtt": quiet, "transitions": quiet},
        fmt="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@click.group(cls=EdgeGroup, configure_logging=_configure_logging)
def cli() -> None:
    """Collect edgepack fleet telemetry from MQTT into SQLite or PostgreSQL.

    --debug, -v/--verbose and --json work before or after the command name.
    """


@cli.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    help="YAML or JSON settings file (same names as the flags, with _).",
)
@settings_options(CollectorSettings)
def serve(config_file: Path | None, **flags) -> None:
    """Subscribe to the fleet, store its telemetry, and serve the API and fleet page.

    Every option can also come from --config FILE or EDGE_COLLECTOR_<NAME> variables.
    """
    from edge_runtime.settings import load_settings

    from .server import run_server
    from .settings import ENV_PREFIX

    if flags.get("embedded_broker") and not flags.get("mqtt_version"):
        flags["mqtt_version"] = "3.1.1"  # amqtt speaks nothing newer
    settings = load_settings(CollectorSettings, ENV_PREFIX, config_file, flags)
    run_server(settings)


@cli.command()
@click.option("--db", required=True, help="sqlite:///fleet.db or postgresql://host/db.")
def migrate(db: str) -> None:
    """Apply pending schema migrations to --db and list them."""
    from .storage import Storage

    storage = Storage(db)
    if json_requested():
        click.echo(json.dumps({"applied": storage.applied_migrations()}))
    else:
        click.echo("applied: " + ", ".join(storage.applied_migrations()))
    storage.close()


@cli.command()
@click.argument("password_file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("user")
@click.option(
    "--password",
    prompt=True,
    hide_input=True,
    confirmation_prompt=True,
    envvar="EDGE_COLLECTOR_NEW_PASSWORD",
    help="The new password (asked if not given; or EDGE_COLLECTOR_NEW_PASSWORD).",
)
def passwd(password_file: Path, user: str, password: str) -> None:
    """Add USER to (or change it in) --embedded-broker's PASSWORD_FILE.

    A device logs in with its device id as USER; add one user for the collector too, and
    give the collector --username and --password. The file holds argon2 hashes only.
    """
    from .broker import set_password

    set_password(password_file, user, password)
    click.echo(f"{user} set in {password_file}")


def main() -> None:
    run_cli(cli, (CollectorError, EdgeRuntimeError))


if __name__ == "__main__":
    main()
