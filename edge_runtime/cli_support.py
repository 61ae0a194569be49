"""What the ``edgepack``, ``edge-runtime`` and ``edge-collector`` CLIs share.

Library code raises; ``run_cli`` is the one place that turns an error into one red line
and an exit code (1 for errors, 2 for usage). Every group and every command takes the same
three options, ``--debug`` (show the traceback instead), ``-v/--verbose`` and ``--json``, so
they work before or after the command name.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import click
from pydantic import ValidationError


@dataclass
class CliState:
    """The group-level options, shared by the group and the command it runs."""

    debug: bool = False
    verbose: bool = False
    json: bool = False


def cli_state(ctx: click.Context | None = None) -> CliState:
    """The state of the running command line (kept on the root context)."""
    root = (ctx or click.get_current_context()).find_root()
    if not isinstance(root.obj, CliState):
        root.obj = CliState()
    return root.obj


def json_requested(ctx: click.Context | None = None) -> bool:
    """True when ``--json`` was given, before or after the command name."""
    return cli_state(ctx).json


def _remember(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        setattr(cli_state(ctx), param.name, True)


COMMON_OPTIONS = {
    "--debug": "Show the traceback of an error instead of one line.",
    "--verbose": "Log what the program does to stderr.",
    "--json": "Print the result as JSON, for scripts.",
}


def _common_option(flag: str) -> click.Option:
    decls = ["-v", flag] if flag == "--verbose" else [flag]
    return click.Option(
        decls,
        is_flag=True,
        expose_value=False,
        callback=_remember,
        help=COMMON_OPTIONS[flag],
    )


def _add_common_options(command: click.Command) -> None:
    taken = {opt for param in command.params for opt in param.opts}
    for flag in COMMON_OPTIONS:
        if flag not in taken:
            command.params.append(_common_option(flag))


class EdgeCommand(click.Command):
    """A command that takes the common options and honours them when given on the group.

    A command with its own ``--json`` flag (parameter ``as_json``) sees it set by the
    group-level ``--json`` too.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _add_common_options(self)

    def invoke(self, ctx: click.Context):
        state = cli_state(ctx)
        root = ctx.find_root().command
        if isinstance(root, EdgeGroup) and root.configure_logging is not None:
            root.configure_logging(state)
        if state.json and "as_json" in ctx.params:
            ctx.params["as_json"] = True
        return super().invoke(ctx)


class EdgeGroup(click.Group):
    """A command group whose commands (and sub-groups) all take the common options.

    ``configure_logging(state)`` runs once the command line is parsed, just before the
    command runs.
    """

    command_class = EdgeCommand
    group_class = type  # sub-groups are EdgeGroups too

    def __init__(
        self, *args, configure_logging: Callable[[CliState], None] | None = None, **kwargs
    ) -> None:
        kwargs.setdefault("context_settings", {"help_option_names": ["-h", "--help"]})
        super().__init__(*args, **kwargs)
        self.configure_logging = configure_logging
        _add_common_options(self)


def set_log_levels(levels: dict[str, int], fmt: str = "%(message)s") -> None:
    """Log to stderr at ``levels[""]`` (unless the process already logs somewhere), and set
    the named loggers' levels."""
    logging.basicConfig(level=levels[""], format=fmt)
    for name, level in levels.items():
        if name:
            logging.getLogger(name).setLevel(level)


class OptionError(click.ClickException):
    """A bad option value: one red line, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.secho(f"error: {self.format_message()}", fg="red", err=True)


def run_cli(group: click.Group, handled: tuple[type[BaseException], ...]) -> None:
    state = CliState()
    try:
        group.main(standalone_mode=False, obj=state)
    except click.exceptions.Abort:
        click.secho("aborted", fg="red", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except handled as exc:
        if state.debug:
            raise
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(getattr(exc, "exit_code", 1))
    except ValidationError as exc:  # a settings model built outside the option helpers
        if state.debug:
            raise
        from .settings import describe_validation_error

        problems = describe_validation_error(exc)
        click.secho(f"error: invalid settings: {problems}", fg="red", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


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
