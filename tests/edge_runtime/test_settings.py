"""Tests for edge_runtime/settings.py (one settings schema: file < environment < flags)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from edge_runtime.agent import ENV_PREFIX, AgentSettings
from edge_runtime.settings import MqttSettings, SettingsError, load_settings

REQUIRED = {"fleet": "plant-7", "device_id": "pi-1", "bundle": "model.edgepkg"}
SECRET = "hunter2-do-not-log"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No EDGE_RUNTIME_* variable from the outside world leaks into these tests."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def write_config(folder: Path, data: dict, fmt: str) -> Path:
    if fmt == "json":
        path = folder / "agent.json"
        path.write_text(json.dumps(data))
    else:
        path = folder / f"agent.{fmt}"
        path.write_text(yaml.safe_dump(data))
    return path


def load(config_file: Path | None = None, **overrides) -> AgentSettings:
    return load_settings(AgentSettings, ENV_PREFIX, config_file, overrides)


@pytest.mark.parametrize(
    ("in_file", "in_env", "in_flags", "expected"),
    [
        (False, False, False, 15),  # the field default
        (True, False, False, 20),
        (False, True, False, 25),
        (True, True, False, 25),
        (False, False, True, 30),
        (True, False, True, 30),
        (True, True, True, 30),
    ],
)
@pytest.mark.parametrize("fmt", ["yaml", "yml", "json"])
def test_precedence_is_defaults_file_environment_flags(
    tmp_path, monkeypatch, fmt, in_file, in_env, in_flags, expected
):
    config = write_config(tmp_path, {**REQUIRED, **({"keepalive_s": 20} if in_file else {})}, fmt)
    if in_env:
        monkeypatch.setenv("EDGE_RUNTIME_KEEPALIVE_S", "25")

    settings = load(config, **({"keepalive_s": 30} if in_flags else {}))

    assert settings.keepalive_s == expected
    assert settings.fleet == "plant-7"
    assert settings.bundle == Path("model.edgepkg")


def test_flags_given_as_none_are_not_given(tmp_path, monkeypatch):
    config = write_config(tmp_path, {**REQUIRED, "metrics_interval_s": 2.5}, "yaml")
    monkeypatch.setenv("EDGE_RUNTIME_BROKER", "mqtt://broker.local:1884")

    settings = load(config, metrics_interval_s=None, broker=None, device_id="pi-9")

    assert settings.metrics_interval_s == 2.5
    assert settings.broker == "mqtt://broker.local:1884"
    assert settings.device_id == "pi-9"


def test_file_keys_may_use_dashes(tmp_path):
    data = {"fleet": "f", "bundle": "b.edgepkg", "device-id": "x", "metrics-interval-s": 3}
    config = write_config(tmp_path, data, "yaml")

    settings = load(config)

    assert settings.metrics_interval_s == 3.0
    assert settings.device_id == "x"


def test_environment_alone_is_enough(monkeypatch):
    for name, value in REQUIRED.items():
        monkeypatch.setenv(f"EDGE_RUNTIME_{name.upper()}", value)
    monkeypatch.setenv("EDGE_RUNTIME_WINDOW", "17")

    settings = load()

    assert (settings.fleet, settings.device_id, settings.window) == ("plant-7", "pi-1", 17)


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_an_unknown_key_in_the_file_is_named(tmp_path, fmt):
    config = write_config(tmp_path, {**REQUIRED, "metrics_intervall_s": 5}, fmt)

    with pytest.raises(SettingsError, match=f"agent.{fmt}: metrics_intervall_s: unknown setting"):
        load(config)


def test_an_unknown_environment_variable_is_named(monkeypatch):
    monkeypatch.setenv("EDGE_RUNTIME_BROKR", "mqtt://x")

    with pytest.raises(
        SettingsError, match="unknown settings in the environment: EDGE_RUNTIME_BROKR"
    ):
        load(**REQUIRED)


def test_a_missing_required_setting_is_named():
    with pytest.raises(SettingsError, match=r"device_id: Field required.*EDGE_RUNTIME_\*"):
        load(fleet="f", bundle="b.edgepkg")


def test_a_bad_value_is_named(monkeypatch):
    monkeypatch.setenv("EDGE_RUNTIME_KEEPALIVE_S", "soon")

    with pytest.raises(
        SettingsError, match="EDGE_RUNTIME_KEEPALIVE_S=soon: Input should be a valid integer"
    ):
        load(**REQUIRED)


@pytest.mark.parametrize(
    ("source", "named"),
    [
        ("flag", "--window 0: "),
        ("environment", "EDGE_RUNTIME_WINDOW=0: "),
        ("file", "agent.yaml: window=0: "),
    ],
)
def test_an_out_of_range_value_names_where_it_came_from_and_the_range(
    tmp_path, monkeypatch, source, named
):
    config = write_config(tmp_path, {"window": 0} if source == "file" else {}, "yaml")
    if source == "environment":
        monkeypatch.setenv("EDGE_RUNTIME_WINDOW", "0")

    with pytest.raises(SettingsError) as error:
        load(config, **REQUIRED, **({"window": 0} if source == "flag" else {}))

    message = str(error.value)
    assert f"({named}Input should be greater than or equal to 1 (allowed: 1 <= x <= 10000))" in (
        message
    )
    assert error.value.exit_code == 2
    assert "\n" not in message


@pytest.mark.parametrize(
    "broker", ["http://host:1883", "127.0.0.1:1883", "mqtt://", "tcp://host:1883", "host"]
)
def test_a_bad_broker_url_shows_the_expected_form(broker):
    with pytest.raises(SettingsError, match="must look like mqtt://host:1883 or mqtts://host:8883"):
        load(**REQUIRED, broker=broker)


def test_a_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="config file .*absent.yaml does not exist"):
        load(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("name", "text", "phrase"),
    [
        ("agent.yaml", "fleet: [unclosed", "does not parse"),
        ("agent.json", "{fleet: 1}", "does not parse"),
        ("agent.yaml", "- a\n- b\n", "must hold a mapping"),
    ],
)
def test_a_malformed_config_file_is_an_error(tmp_path, name, text, phrase):
    path = tmp_path / name
    path.write_text(text)

    with pytest.raises(SettingsError, match=phrase):
        load(path)


@pytest.mark.parametrize(
    ("broker", "tls_ca", "expected"),
    [
        ("mqtt://broker.local", None, ("broker.local", 1883, False)),
        ("mqtt://broker.local:1884", None, ("broker.local", 1884, False)),
        ("mqtts://broker.local", None, ("broker.local", 8883, True)),
        ("mqtts://broker.local:9883", None, ("broker.local", 9883, True)),
        ("mqtt://10.0.0.5", "ca.pem", ("10.0.0.5", 8883, True)),  # a CA means TLS
    ],
)
def test_broker_address(broker, tls_ca, expected):
    settings = MqttSettings(broker=broker, tls_ca=tls_ca)

    assert settings.broker_address() == expected


def test_the_password_never_shows(tmp_path):
    config = write_config(tmp_path, {**REQUIRED, "username": "dev", "password": SECRET}, "yaml")

    settings = load(config)

    assert settings.password.get_secret_value() == SECRET
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert SECRET not in text


def test_the_password_never_shows_in_a_settings_error(monkeypatch):
    monkeypatch.setenv("EDGE_RUNTIME_PASSWORD", SECRET)

    with pytest.raises(SettingsError) as error:
        load(**REQUIRED, keepalive_s="bad")

    assert SECRET not in str(error.value)
