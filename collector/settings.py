"""The collector's one settings schema (flags, EDGE_COLLECTOR_* variables, --config file)."""

from __future__ import annotations

import socket

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

    def resolved_client_id(self) -> str:
        suffix = f"-{self.shared_group}" if self.shared_group else ""
        return self.client_id or f"edge-collector-{socket.gethostname()}{suffix}"
