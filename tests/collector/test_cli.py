"""``edge-collector`` as a user runs it: a real process, an embedded broker, a real agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from collector.broker import set_password
from collector.cli import cli, main
from collector.settings import CollectorSettings
from edge_runtime.cli_options import SettingOption
from tests.brokers import free_port, wait_for_port


def collector_cli(*args: str, env: dict | None = None, **kwargs):
    command = [sys.executable, "-c", "from collector.cli import main; main()", *args]
    return subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kwargs,
    )


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_embedded_broker_collects_a_3_1_1_agent_end_to_end(cnn_bundle, keypair, tmp_path):
    mqtt_port, http_port = free_port(), free_port()
    passwd = tmp_path / "passwd"
    for user, password in (("collector", "c0llect"), ("pi-01", "pi-secret")):
        set_password(passwd, user, password)
    collector = collector_cli(
        "serve",
        "--embedded-broker",
        "--broker-password-file",
        str(passwd),
        "--username",
        "collector",
        "--broker",
        f"mqtt://127.0.0.1:{mqtt_port}",
        "--db",
        f"sqlite:///{tmp_path / 'fleet.db'}",
        "--http-port",
        str(http_port),
        env={"EDGE_COLLECTOR_PASSWORD": "c0llect"},
    )
    agent = None
    try:
        wait_for_port(http_port, timeout_s=30)
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edge_runtime.cli",
                "agent",
                str(cnn_bundle),
                "--pubkey",
                str(keypair[1]),
                "--broker",
                f"mqtt://127.0.0.1:{mqtt_port}",
                "--fleet",
                "demo",
                "--device-id",
                "pi-01",
                "--mqtt-version",
                "3.1.1",
                "--username",
                "pi-01",
                "--metrics-interval-s",
                "0.5",
                "--demo-load",
                "20",
                "--state-dir",
                str(tmp_path / "device"),
            ],
            env={**os.environ, "EDGE_RUNTIME_PASSWORD": "pi-secret"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 30
        device = None
        while time.monotonic() < deadline:
            devices = get_json(f"http://127.0.0.1:{http_port}/api/devices")
            device = devices[0] if devices else None
            if device and device["status"] == "online" and device["inferences_recent"] > 0:
                break
            time.sleep(0.3)
        page = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=5).read()
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            agent.communicate(timeout=30)
        collector.send_signal(signal.SIGTERM)
        output, _ = collector.communicate(timeout=30)

    assert device is not None, output
    assert device["device_id"] == "pi-01"
    assert device["bundle"]["name"] == "digits-cnn"
    assert device["inferences_recent"] > 0
    assert b"edgepack fleet" in page
    assert collector.returncode == 0, output
    assert "MQTT 3.1.1 only" in output


def test_migrate_lists_the_applied_migrations(tmp_path):
    done = collector_cli("migrate", "--db", f"sqlite:///{tmp_path / 'fleet.db'}")
    output, _ = done.communicate(timeout=30)

    assert done.returncode == 0
    assert output.strip() == "applied: 0001_initial, 0002_quarantine_boot_ends"


@pytest.mark.parametrize(
    ("args", "env", "message", "code"),
    [
        (["serve", "--broker", "ftp://x"], {}, "must look like mqtt://host:1883", 2),
        (["serve"], {"EDGE_COLLECTOR_TYPO": "1"}, "unknown settings in the environment", 2),
        (["serve", "--db", "mysql://x/y"], {}, "unsupported database URL", 1),
        (["serve", "--http-port", "70000"], {}, "--http-port 70000: Input should be less", 2),
        (
            [
                "serve",
                "--shared-group",
                "g",
                "--mqtt-version",
                "3.1.1",
                "--db",
                "sqlite:///:memory:",
            ],
            {},
            "needs MQTT 5",
            2,
        ),
        (["serve", "--embedded-broker"], {}, "--embedded-broker refuses anonymous clients", 2),
        (
            ["serve", "--embedded-broker", "--broker-password-file", "passwd"],
            {},
            "the collector logs in to its embedded broker too: give --username",
            2,
        ),
        (["serve", "--allow-anonymous"], {}, "allow_anonymous are for --embedded-broker", 2),
    ],
)
def test_bad_settings_are_one_error_line(args, env, message, code, tmp_path):
    done = collector_cli(*args, env=env, cwd=tmp_path)
    output, _ = done.communicate(timeout=30)

    assert done.returncode == code, output
    assert message in output
    assert output.startswith("error: ")
    assert len(output.strip().splitlines()) == 1, output


# --- edge-collector serve: options generated from CollectorSettings ------------------------

# field -> (the flags a user types, the value CollectorSettings then holds)
FLAG_VALUES = {
    "broker": (["--broker", "mqtt://broker.local:1884"], "mqtt://broker.local:1884"),
    "username": (["--username", "collector"], "collector"),
    "password": (["--password", "s3cret"], "s3cret"),
    "tls_ca": (["--tls-ca", "ca.pem"], Path("ca.pem")),
    "tls_cert": (["--tls-cert", "cert.pem"], Path("cert.pem")),
    "tls_key": (["--tls-key", "key.pem"], Path("key.pem")),
    "mqtt_version": (["--mqtt-version", "3.1.1"], "3.1.1"),
    "keepalive_s": (["--keepalive-s", "30"], 30),
    "db": (["--db", "sqlite:///other.db"], "sqlite:///other.db"),
    "fleet": (["--fleet", "shop"], "shop"),
    "shared_group": (["--shared-group", "writers"], "writers"),
    "client_id": (["--client-id", "collector-2"], "collector-2"),
    "http_host": (["--http-host", "0.0.0.0"], "0.0.0.0"),
    "http_port": (["--http-port", "9090"], 9090),
    "heartbeat_timeout_s": (["--heartbeat-timeout-s", "12.5"], 12.5),
    "embedded_broker": (["--embedded-broker", "--allow-anonymous"], True),
    "allow_anonymous": (["--embedded-broker", "--allow-anonymous"], True),
    "broker_password_file": (
        ["--embedded-broker", "--broker-password-file", "passwd", "--username", "collector"],
        Path("passwd"),
    ),
    "batch_size": (["--batch-size", "50"], 50),
    "session_expiry_s": (["--session-expiry-s", "60"], 60),
}


@pytest.fixture
def served_settings(monkeypatch):
    """Run ``edge-collector serve`` in process up to the library call; return its settings."""
    for name in list(os.environ):
        if name.startswith("EDGE_COLLECTOR_"):
            monkeypatch.delenv(name)
    seen = {}
    monkeypatch.setattr("collector.server.run_server", lambda settings: seen.update(s=settings))

    def invoke(*args: str):
        result = CliRunner().invoke(cli, ["serve", *args])
        assert result.exit_code == 0, result.output
        return seen["s"]

    return invoke


def test_every_collector_setting_has_a_flag_whose_help_is_its_description():
    options = {
        p.field_name: p for p in cli.commands["serve"].params if isinstance(p, SettingOption)
    }

    assert set(options) == set(CollectorSettings.model_fields)
    for name, option in options.items():
        assert option.help == CollectorSettings.model_fields[name].description
    assert set(FLAG_VALUES) == set(options)


@pytest.mark.parametrize("field", sorted(FLAG_VALUES))
def test_each_serve_flag_reaches_the_settings(served_settings, field):
    args, expected = FLAG_VALUES[field]

    settings = served_settings(*args)

    value = getattr(settings, field)
    assert (value.get_secret_value() if field == "password" else value) == expected
    assert value != CollectorSettings.model_fields[field].default


def test_the_embedded_broker_speaks_3_1_1_unless_told_otherwise(served_settings):
    assert served_settings("--embedded-broker", "--allow-anonymous").mqtt_version == "3.1.1"
    assert served_settings().mqtt_version == "5"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--batch-size", "0"], "--batch-size 0: Input should be greater than or equal to 1"),
        (["--heartbeat-timeout-s", "0"], "--heartbeat-timeout-s 0.0: Input should be greater"),
    ],
)
def test_an_out_of_range_serve_option_is_one_line_and_exit_2(monkeypatch, capsys, args, line):
    monkeypatch.setattr(sys, "argv", ["edge-collector", "serve", *args])

    with pytest.raises(SystemExit) as exit_:
        main()

    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert len(lines) == 1
    assert lines[0].startswith(f"error: invalid settings ({line}")
    assert "(allowed: x " in lines[0]


def test_migrate_json(tmp_path):
    db = f"sqlite:///{tmp_path / 'f.db'}"

    result = CliRunner().invoke(cli, ["--json", "migrate", "--db", db])

    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"applied": ["0001_initial", "0002_quarantine_boot_ends"]}
