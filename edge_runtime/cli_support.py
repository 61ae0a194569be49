"""Error rendering shared by the ``edgepack`` and ``edge-runtime`` CLIs.

Library code raises; this is the one place that turns an error into one red line and
an exit code (1 for errors, 2 for usage). ``--debug`` anywhere on the command line
shows the traceback instead.
"""

from __future__ import annotations

import sys

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
