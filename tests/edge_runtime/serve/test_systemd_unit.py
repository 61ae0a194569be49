"""`edge-runtime systemd-unit`: the unit file it prints, read back as systemd reads it."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_runtime.cli import cli, main
from edge_runtime.serve.systemd import unit_file


def parse_unit(text: str) -> configparser.ConfigParser:
    # strict: a key given twice is an error; no interpolation: %% is systemd's, not ours
    unit = configparser.ConfigParser(strict=True, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # systemd's keys are case-sensitive
    unit.read_string(text)
    return unit


def print_unit(args: list[str]) -> str:
    result = CliRunner().invoke(cli, ["systemd-unit", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_the_unit_runs_serve_supervised_and_confined(tmp_path, monkeypatch):
    bundle = tmp_path / "digits.edgepkg"
    bundle.write_bytes(b"")
    monkeypatch.chdir(tmp_path)

    text = print_unit(
        ["digits.edgepkg", "--pubkey", "/etc/edgepack/pub.pem", "--port", "8000", "-v"]
    )
    unit = parse_unit(text)

    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["WatchdogSec"] == "30"
    assert service["Restart"] == "on-failure"
    assert service["User"] == service["Group"] == "edgepack"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""
    assert "EDGEPACK_HOME=/var/lib/edgepack" in service["Environment"].split()
    assert int(unit["Unit"]["StartLimitBurst"]) >= 1
    assert int(unit["Unit"]["StartLimitIntervalSec"]) > 0
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    program, *words = shlex.split(service["ExecStart"])
    assert Path(program).is_absolute()
    # The relative bundle is made absolute; -v went to systemd-unit, not to serve.
    assert words[words.index("serve") :] == [
        "serve",
        str(bundle.resolve()),
        "--pubkey",
        "/etc/edgepack/pub.pem",
        "--port",
        "8000",
    ]


def test_options_of_the_unit_and_arguments_after_double_dash(tmp_path):
    program = Path(sys.executable).resolve()

    text = print_unit(
        [
            "--user",
            "inference",
            "--watchdog-sec",
            "10",
            "--executable",
            str(program),
            "--",
            "/opt/my models/a.edgepkg",
            "-v",
            "--name=50%$HOME",
        ]
    )

    service = parse_unit(text)["Service"]
    assert (service["User"], service["WatchdogSec"]) == ("inference", "10")
    assert service["ExecStart"] == (
        f'{program} serve "/opt/my models/a.edgepkg" -v --name=50%%$$HOME'
    )


def test_a_missing_relative_file_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "argv", ["edge-runtime", "systemd-unit", "models/digits.edgepkg", "--port", "8000"]
    )

    with pytest.raises(SystemExit) as exit_:
        main()

    captured = capsys.readouterr()
    assert exit_.value.code == 2
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        "error: models/digits.edgepkg does not exist here: give the path the device will "
        "have, absolute (systemd starts the service in /)"
    ]


@pytest.mark.parametrize(
    ("word", "written"),
    [
        ("plain", "plain"),
        ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("100%", "100%%"),
        ("$HOME", "$$HOME"),
        (";", '";"'),
        ("", '""'),
    ],
)
def test_exec_start_words_are_quoted_for_systemd(word, written):
    exec_start = parse_unit(unit_file(["/usr/bin/edge-runtime", word]))["Service"]["ExecStart"]

    assert exec_start == f"/usr/bin/edge-runtime {written}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is absent")
def test_systemd_itself_reads_the_unit_without_a_warning(tmp_path):
    path = tmp_path / "edge-runtime.service"
    path.write_text(unit_file([str(Path(sys.executable).resolve()), "serve", "/opt/a.edgepkg"]))

    checked = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
    )

    assert checked.returncode == 0, checked.stderr
    assert checked.stderr == ""
