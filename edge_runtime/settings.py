"""One settings schema per program; a config file, the environment and CLI flags all feed it.

Precedence, lowest first: field defaults, the config file (YAML or JSON), environment
variables (``<PREFIX><FIELD>`` upper-cased, e.g. ``EDGE_RUNTIME_BROKER``), then CLI flags.
Because all three are read through the same pydantic model, they cannot drift apart, and a
typo in any of them is an error that names the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from .errors import EdgeRuntimeError


class SettingsError(EdgeRuntimeError):
    """Settings are invalid or incomplete (a usage error: exit code 2)."""

    exit_code = 2


class MqttSettings(BaseModel):
    """How to reach the MQTT broker (shared by the agent and the collector)."""

    model_config = ConfigDict(extra="forbid")

    broker: str = Field(
        "mqtt://127.0.0.1:1883", description="mqtt://host:port, or mqtts://host:port for TLS"
    )
    username: str | None = Field(None, description="MQTT user name")
    password: SecretStr | None = Field(
        None, description="MQTT password (better in the environment: `ps` shows flags)"
    )
    tls_ca: Path | None = Field(None, description="CA certificate (PEM) that signed the broker's")
    tls_cert: Path | None = Field(None, description="client certificate (PEM), for mutual TLS")
    tls_key: Path | None = Field(None, description="client private key (PEM), for mutual TLS")
    mqtt_version: Literal["5", "3.1.1"] = Field(
        "5", description="MQTT protocol; 3.1.1 only for brokers without MQTT 5 (amqtt)"
    )
    keepalive_s: int = Field(15, ge=5, description="MQTT keep-alive; the Will fires ~1.5x later")

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise ValueError(
                f"broker {value!r} must look like mqtt://host:1883 or mqtts://host:8883"
            )
        return value

    def broker_address(self) -> tuple[str, int, bool]:
        parsed = urlparse(self.broker)
        tls = parsed.scheme == "mqtts" or self.tls_ca is not None
        return parsed.hostname or "", parsed.port or (8883 if tls else 1883), tls


Model = TypeVar("Model", bound=BaseModel)


def field_range(model: type[BaseModel], name: str) -> str | None:
    """A numeric field's allowed range, e.g. ``0 <= x <= 1`` or ``x > 0``; None if unbounded."""
    field = model.model_fields.get(name)
    if field is None:
        return None
    bounds = {
        attribute: getattr(item, attribute)
        for item in field.metadata
        for attribute in ("ge", "gt", "le", "lt")
        if getattr(item, attribute, None) is not None
    }
    low = [f"x {op} {bounds[a]}" for a, op in (("ge", ">="), ("gt", ">")) if a in bounds]
    high = [f"x {op} {bounds[a]}" for a, op in (("le", "<="), ("lt", "<")) if a in bounds]
    if low and high:  # "0 <= x <= 1" reads better than "x >= 0 and x <= 1"
        value, op = low[0].split()[2], {">=": "<=", ">": "<"}[low[0].split()[1]]
        return f"{value} {op} {high[0]}"
    return (low + high)[0] if low or high else None


def _shows_input(model: type[BaseModel] | None, name: str, value: Any) -> bool:
    """Echo a bad value back, unless it is a secret or not a plain scalar."""
    if model is None or name not in model.model_fields:
        return False
    if "SecretStr" in repr(model.model_fields[name].annotation):
        return False
    return isinstance(value, (str, int, float, bool)) and len(str(value)) <= 80


def describe_validation_error(
    exc: ValidationError,
    unknown: str = "unknown key",
    model: type[BaseModel] | None = None,
    label: Callable[[str], str] | None = None,
) -> str:
    """One line naming each bad key by its dotted path (profiles, settings).

    With ``model``, a bad value is echoed (secrets never are) and a numeric field's allowed
    range is added; ``label`` names a top-level field as the user gave it (``--window``,
    ``EDGE_RUNTIME_WINDOW``).
    """
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        where = ".".join(loc) or "settings"
        if loc and label is not None:
            where = ".".join([label(loc[0]), *loc[1:]])
        if error["type"] == "extra_forbidden":
            problems.append(f"{where}: {unknown}")
            continue
        text = f"{where}: {error['msg']}"
        if len(loc) == 1 and error["type"] != "missing":
            if _shows_input(model, loc[0], error.get("input")):
                joint = " " if where.startswith("--") else "="  # --window 0, WINDOW=0
                text = f"{where}{joint}{error['input']}: {error['msg']}"
            allowed = field_range(model, loc[0]) if model is not None else None
            if allowed:
                text += f" (allowed: {allowed})"
        problems.append(text)
    return "; ".join(problems)


def flag_for(name: str) -> str:
    """The command-line flag of settings field ``name``: ``--kebab-case``."""
    return "--" + name.replace("_", "-")


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SettingsError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml/json raise their own types
        raise SettingsError(f"config file {path} does not parse: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a mapping of setting: value")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def load_settings(
    model: type[Model],
    env_prefix: str,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Model:
    """Build ``model`` from defaults < config file < environment < ``overrides``.

    ``overrides`` are CLI flags; None values mean "not given" and are skipped.

    Raises:
        SettingsError: an unknown key anywhere, a bad value, or a missing required one.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_file is not None:
        values.update(_read_config_file(Path(config_file)))
        sources.update({name: f"{Path(config_file).name}: {name}" for name in values})
    for name in model.model_fields:
        env_name = f"{env_prefix}{name.upper()}"
        if env_name in os.environ:
            values[name] = os.environ[env_name]
            sources[name] = env_name
    unknown_env = sorted(
        key
        for key in os.environ
        if key.startswith(env_prefix) and key[len(env_prefix) :].lower() not in model.model_fields
    )
    if unknown_env:
        raise SettingsError(f"unknown settings in the environment: {', '.join(unknown_env)}")
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(flags)
    sources.update({name: flag_for(name) for name in flags})
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = describe_validation_error(
            exc, "unknown setting", model, lambda name: sources.get(name, name)
        )
        raise SettingsError(
            f"invalid settings ({problems}); settings come from flags, {env_prefix}* "
            "environment variables, or --config FILE"
        ) from None
