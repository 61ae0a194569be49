import os
import signal
import sys
import threading

import click
import pytest
from click.testing import CliRunner

from edge_runtime.cli_support import EdgeGroup, cli_state, json_requested, run_cli, stop_on_signals


@pytest.fixture
def restore_handlers():
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_main_thread_holds_the_events_lock_does_not_deadlock(
    restore_handlers, signum
):
    stop = threading.Event()
    stop_on_signals(stop)

    # Inside stop.wait() the main thread holds the event's lock; a handler that called
    # stop.set() right there would wait for that lock forever.
    with stop._cond:
        os.kill(os.getpid(), signum)
        for _ in range(1000):  # give the handler bytecode boundaries to run at
            pass

    assert stop.wait(5)


def recording_group(seen: dict) -> click.Group:
    """A real EdgeGroup with one command that reports what it was given."""

    @click.group(cls=EdgeGroup, configure_logging=lambda state: seen.update(logged=state.verbose))
    def group() -> None:
        """A group."""

    @group.command()
    @click.argument("value", required=False)
    @click.option("--name")
    def plain(value: str | None, name: str | None) -> None:
        state = cli_state()
        seen.update(value=value, name=name, debug=state.debug, json=json_requested())

    @group.command()
    @click.option("--json", "as_json", is_flag=True, help="Its own flag.")
    def own(as_json: bool) -> None:
        seen.update(as_json=as_json)

    return group


@pytest.mark.parametrize(
    "args",
    [
        ["--debug", "--json", "-v", "plain"],
        ["plain", "--debug", "--json", "-v"],
        ["--debug", "plain", "--json", "--verbose"],
    ],
)
def test_the_common_options_work_before_or_after_the_command(args):
    seen: dict = {}

    result = CliRunner().invoke(recording_group(seen), args)

    assert result.exit_code == 0, result.output
    assert (seen["debug"], seen["json"], seen["logged"]) == (True, True, True)


def test_without_the_common_options_nothing_is_set():
    seen: dict = {}

    result = CliRunner().invoke(recording_group(seen), ["plain"])

    assert result.exit_code == 0, result.output
    assert (seen["debug"], seen["json"], seen["logged"]) == (False, False, False)


@pytest.mark.parametrize("args", [["--json", "own"], ["own", "--json"]])
def test_a_command_with_its_own_json_flag_sees_the_group_one(args):
    seen: dict = {}

    result = CliRunner().invoke(recording_group(seen), args)

    assert result.exit_code == 0, result.output
    assert seen["as_json"] is True


@pytest.mark.parametrize(
    ("args", "value", "name"),
    [
        (["plain", "--name", "--debug"], None, "--debug"),
        (["plain", "--", "--debug"], "--debug", None),
    ],
)
def test_a_literal_debug_argument_is_left_alone(args, value, name):
    seen: dict = {}

    result = CliRunner().invoke(recording_group(seen), args)

    assert result.exit_code == 0, result.output
    assert (seen["value"], seen["name"], seen["debug"]) == (value, name, False)


def test_run_cli_renders_a_stray_validation_error_as_one_line(monkeypatch, capsys):
    from pydantic import BaseModel, Field

    class Limits(BaseModel):
        window: int = Field(ge=1)

    @click.group(cls=EdgeGroup)
    def group() -> None:
        """A group."""

    @group.command()
    def check() -> None:
        Limits(window=0)

    monkeypatch.setattr(sys, "argv", ["prog", "check"])

    with pytest.raises(SystemExit) as exit_:
        run_cli(group, ())

    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: invalid settings: window: Input should be greater than or equal to 1"
    ]
