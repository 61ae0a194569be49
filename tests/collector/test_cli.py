"""``edge-collector`` as a user runs it: a real process, an embedded broker, a real agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

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
    collector = collector_cli(
        "serve",
        "--embedded-broker",
        "--broker",
        f"mqtt://127.0.0.1:{mqtt_port}",
        "--db",
        f"sqlite:///{tmp_path / 'fleet.db'}",
        "--http-port",
        str(http_port),
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
                "--metrics-interval-s",
                "0.5",
                "--demo-load",
                "20",
                "--state-dir",
                str(tmp_path / "device"),
            ],
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
    assert output.strip() == "applied: 0001_initial"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["serve", "--broker", "ftp://x"], {}, "must look like mqtt://host:1883"),
        (["serve"], {"EDGE_COLLECTOR_TYPO": "1"}, "unknown settings in the environment"),
        (["serve", "--db", "mysql://x/y"], {}, "unsupported database URL"),
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
        ),
    ],
)
def test_bad_settings_are_one_error_line(args, env, message, tmp_path):
    done = collector_cli(*args, env=env, cwd=tmp_path)
    output, _ = done.communicate(timeout=30)

    assert done.returncode in (1, 2), output
    assert message in output
    assert "Traceback" not in output
