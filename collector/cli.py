"""``edge-collector``: store and show a fleet's telemetry."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from edge_runtime.cli_support import mqtt_options, run_cli
from edge_runtime.errors import EdgeRuntimeError

from .errors import CollectorError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", "-v", is_flag=True, help="Log every connection change and batch.")
def cli(verbose: bool) -> None:
    """Collect edgepack fleet telemetry from MQTT into SQLite or PostgreSQL.

    Add --debug to any command to see a traceback on error.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # the embedded broker narrates every packet at INFO
        for noisy in ("amqtt", "transitions"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


@cli.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    help="YAML or JSON settings file (same names as the flags, with _).",
)
@click.option("--broker", help="mqtt://host:port or mqtts://host:port.")
@click.option("--db", help="sqlite:///fleet.db or postgresql://host/db.")
@click.option("--fleet", help="Fleet to collect ('+' = all).")
@click.option("--shared-group", help="MQTT 5 shared-subscription group for scale-out.")
@click.option("--client-id", help="Stable MQTT client id (keeps the broker session).")
@click.option("--http-host", help="HTTP API / fleet page address.")
@click.option("--http-port", type=int, help="HTTP port (0 = any free port).")
@click.option("--heartbeat-timeout-s", type=float, help="Silence after which a device is offline.")
@click.option(
    "--embedded-broker",
    is_flag=True,
    default=None,
    help="Start an in-process MQTT 3.1.1 broker (amqtt) on --broker's address.",
)
@mqtt_options("EDGE_COLLECTOR_")
def serve(config_file: Path | None, **flags) -> None:
    """Subscribe to the fleet, store its telemetry, and serve the API and fleet page.

    Every option can also come from --config FILE or EDGE_COLLECTOR_<NAME> variables.
    """
    from edge_runtime.settings import load_settings

    from .server import run_server
    from .settings import ENV_PREFIX, CollectorSettings

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
    click.echo("applied: " + ", ".join(storage.applied_migrations()))
    storage.close()


def main() -> None:
    run_cli(cli, (CollectorError, EdgeRuntimeError))


if __name__ == "__main__":
    main()
