"""The collector's one settings schema (flags, EDGE_COLLECTOR_* variables, --config file)."""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from edge_runtime.settings import MqttSettings
from edge_runtime.telemetry.protocol import check_name

ENV_PREFIX = "EDGE_COLLECTOR_"


class CollectorSettings(MqttSettings):
    db: str = Field("sqlite:///fleet.db", description="sqlite:///PATH or postgresql://HOST/DB")
    fleet: str = Field("+", description="fleet to collect ('+' for every fleet)")
    shared_group: str | None = Field(
        None, description="MQTT 5 shared-subscription group: collectors in it split the load"
    )
    client_id: str | None = Field(
        None, description="MQTT client id (stable, so the broker keeps the session across restarts)"
    )
    http_host: str = Field("127.0.0.1", description="HTTP API and fleet page address")
    http_port: int = Field(8080, ge=0, le=65535, description="HTTP port (0 picks a free one)")
    heartbeat_timeout_s: float = Field(
        35.0, gt=0, description="a device silent this long is marked offline"
    )
    embedded_broker: bool = Field(
        False,
        description="start an in-process MQTT 3.1.1 broker (amqtt) on --broker's address",
    )
    broker_password_file: Path | None = Field(
        None,
        description="--embedded-broker's password file (lines user:argon2-hash, made with "
        "`edge-collector passwd FILE USER`); a device logs in with its device id",
    )
    allow_anonymous: bool = Field(
        False,
        description="let --embedded-broker take clients without a password; each is then who "
        "its client id says (a demo on a trusted network only)",
    )
    batch_size: int = Field(2000, ge=1, description="messages stored per transaction at most")
    session_expiry_s: int = Field(
        3600, ge=0, description="how long the broker keeps our session and queue while we are away"
    )

    @field_validator("fleet")
    @classmethod
    def _fleet_name(cls, value: str) -> str:
        return value if value == "+" else check_name(value, "fleet")

    @model_validator(mode="after")
    def _shared_needs_v5(self) -> CollectorSettings:
        if self.shared_group and self.mqtt_version != "5":
            raise ValueError(
                "shared_group needs MQTT 5 (shared subscriptions); the embedded broker "
                "(amqtt) speaks 3.1.1 only, so use Mosquitto for scale-out"
            )
        return self

    @model_validator(mode="after")
    def _embedded_broker_logins(self) -> CollectorSettings:
        if not self.embedded_broker:
            if self.broker_password_file or self.allow_anonymous:
                raise ValueError(
                    "broker_password_file and allow_anonymous are for --embedded-broker; "
                    "give Mosquitto its own password_file and ACL (docs/telemetry.md)"
                )
            return self
        if self.broker_password_file is None and not self.allow_anonymous:
            raise ValueError(
                "--embedded-broker refuses anonymous clients: give --broker-password-file FILE "
                "(make it with `edge-collector passwd FILE USER`, one user per device id and "
                "one for the collector), or --allow-anonymous for a demo on a trusted network"
            )
        if self.broker_password_file is not None and not self.username:
            raise ValueError(
                "the collector logs in to its embedded broker too: give --username and "
                "--password of a user in --broker-password-file"
            )
        return self

    def resolved_client_id(self) -> str:
        suffix = f"-{self.shared_group}" if self.shared_group else ""
        return self.client_id or f"edge-collector-{socket.gethostname()}{suffix}"
