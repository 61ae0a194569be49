"""``edge-runtime serve``'s settings: flags generated from ``ServeSettings``, the
environment and --config feeding the same model, and agent's telemetry options."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from edge_runtime import cli as cli_module
from edge_runtime.serve import server as server_module
from edge_runtime.serve.settings import ServeSettings
from edge_runtime.telemetry.client import TelemetrySettings

from .conftest import run_edge_runtime


@pytest.fixture
def passed_on(monkeypatch):
    """Invoke ``serve`` with ARGS; returns the settings it hands to ``run_serve``."""
    seen = []

    def fake_run_serve(settings, stop=None, extensions=()):
        seen.append(settings)
        return 0

    monkeypatch.setattr(server_module, "run_serve", fake_run_serve)
    # CliRunner's stderr has no file descriptor for faulthandler's SIGUSR1 dump.
    monkeypatch.setattr(cli_module, "stop_on_signals", lambda stop: None)

    def invoke(*args: str, env: dict[str, str] | None = None) -> ServeSettings:
        result = CliRunner().invoke(cli_module.cli, ["serve", *args], env=env)
        assert result.exit_code == 0, result.output
        return seen[-1]

    return invoke


def test_serve_takes_every_telemetry_option_of_agent():
    for name, field in TelemetrySettings.model_fields.items():
        assert name in ServeSettings.model_fields
        assert ServeSettings.model_fields[name].description.startswith(field.description)
    assert ServeSettings(bundles=["b"]).telemetry() is None


def test_flags_environment_and_config_file_build_the_settings(passed_on, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("queue_size: 3\nport: 9000\nmax_batch_size: 2\n")

    settings = passed_on(
        "a.edgepkg",
        "named=b.edgepkg",
        "--config",
        str(config),
        "--port",
        "9001",
        "--fleet",
        "shop",
        "--device-id",
        "pi-01",
        "--max-queue-delay-ms",
        "4",
        env={"EDGE_RUNTIME_QUEUE_SIZE": "5"},
    )

    assert settings.bundles == ["a.edgepkg", "named=b.edgepkg"]
    assert settings.port == 9001  # the flag wins over the file
    assert settings.queue_size == 5  # the environment wins over the file
    assert settings.max_batch_size == 2 and settings.max_queue_delay_ms == 4
    assert settings.host == "127.0.0.1" and settings.grpc_port is None
    telemetry = settings.telemetry()
    assert (telemetry.fleet, telemetry.device_id) == ("shop", "pi-01")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["b.edgepkg", "--queue-size", "0"], "--queue-size 0: Input should be greater than"),
        (["b.edgepkg", "--fleet", "shop"], "--fleet and --device-id go together"),
        (
            ["b.edgepkg", "--tls-certfile", "cert.pem"],
            "--tls-certfile and --tls-keyfile go together",
        ),
        (["b.edgepkg", "--fleet", "a/b", "--device-id", "d"], "fleet 'a/b' is not a valid name"),
        ([], "give at least one BUNDLE"),
    ],
)
def test_bad_settings_are_one_line_and_exit_code_2(args, words):
    result = run_edge_runtime("serve", *args)

    assert result.returncode == 2, result.stderr
    assert words in result.stderr
    assert result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1
