"""``ServeSettings``: everything ``edge-runtime serve`` takes, from flags, the environment
(``EDGE_RUNTIME_*``) or ``--config``, through one model (``edge_runtime.settings``).

The telemetry options are ``agent``'s own fields (``TelemetrySettings``), copied here with
``--fleet`` and ``--device-id`` made optional: without them, ``serve`` reports nothing.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

from ..settings import MqttSettings
from ..telemetry.client import TelemetrySettings
from ..telemetry.protocol import check_name

DEFAULT_MAX_BODY_BYTES = 64 * 2**20
LOOPBACK_NAMES = ("localhost",)


class _ServeOptions(BaseModel):
    """The serving options; ``ServeSettings`` adds the telemetry ones after them."""

    model_config = ConfigDict(extra="forbid")

    bundles: list[str] = Field(
        min_length=1, description="bundles to serve: BUNDLE, or NAME=BUNDLE to name it"
    )
    pubkey: Path | None = Field(None, description="public key; else $EDGEPACK_TRUSTED_KEYS")
    threads: int | None = Field(
        None,
        ge=0,
        description="engine threads per model, as given; unset, the profile's is capped at "
        "the CPUs this process may use",
    )
    host: str = Field("127.0.0.1", description="address to listen on (HTTP and gRPC)")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0: any free port)")
    grpc_port: int | None = Field(
        None, ge=0, le=65535, description="gRPC port for the Open Inference Protocol; unset: off"
    )
    api_key_file: Path | None = Field(
        None,
        description="file holding the API key clients send as 'Authorization: Bearer KEY'; "
        "everything but /v2/health/* needs it",
    )
    insecure_no_auth: bool = Field(
        False, description="serve on a non-loopback --host without an API key (not advised)"
    )
    tls_certfile: Path | None = Field(None, description="TLS certificate chain (PEM) for HTTPS")
    tls_keyfile: Path | None = Field(None, description="TLS private key (PEM) for HTTPS")
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES, ge=1024, description="largest request body; bigger gets 413"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, le=600, description="a client must send its request headers within this"
    )
    read_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="a client must send its request body within this"
    )
    keep_alive_s: int = Field(5, ge=1, le=3600, description="idle keep-alive connections close")
    max_connections: int = Field(
        1000, ge=1, description="open connections at most; beyond it new requests get 503"
    )
    queue_size: int = Field(
        16, ge=1, le=100000, description="requests waiting per model; beyond it 503 + Retry-After"
    )
    max_batch_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="dynamic batching: most rows stacked into one run (1 = off); unset: the "
        "bundle's serving section",
    )
    max_queue_delay_ms: float | None = Field(
        None,
        ge=0,
        le=1000,
        description="longest a request waits for others to batch with; unset: the bundle's",
    )
    drain_s: float = Field(
        10.0, ge=0, le=3600, description="on SIGTERM, time in-flight requests get to finish"
    )

    @field_validator("broker", check_fields=False)
    @classmethod
    def _broker_url(cls, value: str) -> str:
        return MqttSettings._broker_url(value)

    @field_validator("fleet", "device_id", check_fields=False)
    @classmethod
    def _topic_safe(cls, value: str | None, info) -> str | None:
        if value is None:
            return None
        return check_name(value, info.field_name.replace("_", " "))

    @model_validator(mode="after")
    def _pairs(self) -> _ServeOptions:
        if (self.fleet is None) != (self.device_id is None):
            raise ValueError("--fleet and --device-id go together: give both to report, or none")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("--tls-certfile and --tls-keyfile go together: give both, or none")
        return self

    def telemetry(self) -> TelemetrySettings | None:
        """The settings ``agent`` would report with; None when --fleet is not given."""
        if self.fleet is None:
            return None
        names = TelemetrySettings.model_fields
        return TelemetrySettings(**{name: getattr(self, name) for name in names})

    def loopback(self) -> bool:
        """Whether ``host`` reaches only this machine."""
        if self.host in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False  # a host name: it may resolve to anything


def _telemetry_fields() -> dict[str, tuple[object, FieldInfo]]:
    """``TelemetrySettings``' fields; the required ones become optional (None: off)."""
    fields: dict[str, tuple[object, FieldInfo]] = {}
    for name, info in TelemetrySettings.model_fields.items():
        if info.is_required():
            description = f"{info.description}; with --fleet and --device-id, serve reports"
            fields[name] = (info.annotation | None, Field(None, description=description))
        else:
            fields[name] = (info.annotation, info)
    return fields


ServeSettings = create_model(
    "ServeSettings", __base__=_ServeOptions, __module__=__name__, **_telemetry_fields()
)
ServeSettings.__doc__ = (
    "Everything ``edge-runtime serve`` needs: flags, EDGE_RUNTIME_* variables or --config."
)
