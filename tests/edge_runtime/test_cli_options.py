"""Tests for edge_runtime/cli_options.py: click options generated from a settings model."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import click
import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from edge_runtime.cli_options import (
    SettingOption,
    given,
    settings_options,
    validate_options,
)
from edge_runtime.cli_support import EdgeGroup


class DemoSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="what to call it")
    size_mb: float = Field(64.0, gt=0, le=1024, description="how big")
    window: int = Field(200, ge=1, description="how many at once")
    mode: Literal["fast", "safe"] = Field("safe", description="how careful")
    enabled: bool = Field(True, description="whether to do it")
    folder: Path | None = Field(None, description="where to put it")
    secret: SecretStr | None = Field(None, description="what not to show")


def demo_command(seen: dict) -> click.Group:
    @click.group(cls=EdgeGroup)
    def group() -> None:
        """A group."""

    @group.command()
    @settings_options(DemoSettings, decls={"folder": ("-o", "--folder")})
    def demo(**options) -> None:
        seen["settings"] = validate_options(DemoSettings, given(options))

    return group


def test_every_field_has_one_option_whose_help_is_the_description():
    group = demo_command({})

    options = [p for p in group.commands["demo"].params if isinstance(p, SettingOption)]

    assert [o.field_name for o in options] == list(DemoSettings.model_fields)
    for option in options:
        assert option.help == DemoSettings.model_fields[option.field_name].description


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--size-mb FLOAT", "how big  [0 < x <= 1024; default: 64.0]"),
        ("--window INTEGER", "how many at once  [x >= 1; default: 200]"),
        ("--mode [fast|safe]", "how careful  [default: safe]"),
        ("--enabled / --no-enabled", "whether to do it  [default: --enabled]"),
        ("-o, --folder PATH", "where to put it"),
    ],
)
def test_help_shows_the_type_range_and_default(flag, expected):
    result = CliRunner().invoke(demo_command({}), ["demo", "--help"])

    text = " ".join(result.output.split())  # click wraps long help lines
    assert result.exit_code == 0
    assert f"{flag} {' '.join(expected.split())}" in text, result.output


def test_flag_values_reach_the_model():
    seen: dict = {}
    args = ["demo", "--name", "n", "--size-mb", "2.5", "--window", "3", "--mode", "fast"]

    result = CliRunner().invoke(demo_command(seen), [*args, "--no-enabled", "-o", "out"])

    assert result.exit_code == 0, result.output
    assert seen["settings"] == DemoSettings(
        name="n", size_mb=2.5, window=3, mode="fast", enabled=False, folder=Path("out")
    )


def test_options_not_given_leave_the_model_defaults():
    seen: dict = {}

    result = CliRunner().invoke(demo_command(seen), ["demo", "--name", "n"])

    assert result.exit_code == 0, result.output
    assert seen["settings"] == DemoSettings(name="n")


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--name", "n", "--size-mb", "0"],
            "error: --size-mb 0.0: Input should be greater than 0 (allowed: 0 < x <= 1024)",
        ),
        (
            ["--name", "n", "--window", "0"],
            "error: --window 0: Input should be greater than or equal to 1 (allowed: x >= 1)",
        ),
        ([], "error: --name: Field required"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_flag_and_the_range(args, line):
    result = CliRunner().invoke(demo_command({}), ["demo", *args])

    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"{line}; see --help for the allowed values"]


def test_a_bad_secret_is_never_echoed():
    class Strict(DemoSettings):
        secret: SecretStr | None = Field(None, min_length=20, description="what not to show")

    @click.command(cls=EdgeGroup.command_class)
    @settings_options(Strict)
    def demo(**options) -> None:
        validate_options(Strict, given(options))

    result = CliRunner().invoke(demo, ["--name", "n", "--secret", "hunter2"])

    assert result.exit_code == 2
    assert "--secret: Value should have at least 20 items" in result.output
    assert "hunter2" not in result.output


def test_a_field_without_a_command_line_type_is_refused_at_definition():
    class Nested(BaseModel):
        inner: DemoSettings = Field(description="a nested model")

    with pytest.raises(TypeError, match="no command-line type"):
        settings_options(Nested)
