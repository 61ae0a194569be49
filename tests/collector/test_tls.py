"""TLS with client certificates and username/password, agent and collector, real Mosquitto."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import time

import pytest
from pydantic import SecretStr

from collector.service import Collector
from collector.settings import CollectorSettings
from collector.storage import Storage
from edge_runtime.telemetry.client import TelemetryClient, TelemetrySettings
from tests.brokers import Mosquitto, free_port


def _issue(name: str, issuer_key, issuer_name, key, ca: bool = False, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256()), subject


def _pem(folder, name: str, cert, key) -> tuple:
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def secure_broker(tmp_path):
    """Mosquitto that requires TLS, a client certificate from our CA, and a password."""
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = tmp_path / "pki"
    folder.mkdir()
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca_cert, ca_name = _issue("edgepack test CA", ca_key, None, ca_key, ca=True)
    server_cert, _ = _issue("127.0.0.1", ca_key, ca_name, server_key, server=True)
    client_cert, _ = _issue("pi-01", ca_key, ca_name, client_key)
    ca_path, _ = _pem(folder, "ca", ca_cert, ca_key)
    server_crt, server_key_path = _pem(folder, "server", server_cert, server_key)
    client_crt, client_key_path = _pem(folder, "client", client_cert, client_key)
    passwords = folder / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "fleet", "s3cret"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    broker = Mosquitto(
        tmp_path / "broker",
        port=port,
        extra_config=(
            f"cafile {ca_path}\ncertfile {server_crt}\nkeyfile {server_key_path}\n"
            "require_certificate true\n"
            f"password_file {passwords}\n"
        ),
    )
    broker.config.write_text(
        broker.config.read_text().replace("allow_anonymous true", "allow_anonymous false")
    )
    broker.start()
    yield broker, {"tls_ca": ca_path, "tls_cert": client_crt, "tls_key": client_key_path}
    broker.stop()


def test_agent_and_collector_over_mutual_tls_with_a_password(secure_broker, tmp_path):
    broker, tls = secure_broker
    url = f"mqtts://127.0.0.1:{broker.port}"
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    collector = Collector(
        CollectorSettings(
            broker=url,
            db=db_url,
            client_id="secure-collector",
            username="fleet",
            password=SecretStr("s3cret"),
            **tls,
        ),
        Storage(db_url),
    ).start()
    device = TelemetryClient(
        TelemetrySettings(
            broker=url,
            fleet="secure",
            device_id="pi-01",
            username="fleet",
            password=SecretStr("s3cret"),
            state_dir=tmp_path / "device",
            metrics_interval_s=0.2,
            **tls,
        )
    ).start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(collector.storage.stream_keys("pi-01")) < 3:
        time.sleep(0.1)
    keys = collector.storage.stream_keys("pi-01")
    device.stop()
    collector.stop()

    assert len(keys) >= 3
    assert keys[0] == (1, 1)


@pytest.mark.parametrize("attack", ["no-client-cert", "wrong-password", "plain-tcp"])
def test_the_secure_broker_turns_away_the_unauthenticated(secure_broker, tmp_path, attack):
    broker, tls = secure_broker
    options = {"username": "fleet", "password": SecretStr("s3cret"), **tls}
    url = f"mqtts://127.0.0.1:{broker.port}"
    if attack == "no-client-cert":
        options.pop("tls_cert")
        options.pop("tls_key")
    elif attack == "wrong-password":
        options["password"] = SecretStr("guess")
    else:
        url = f"mqtt://127.0.0.1:{broker.port}"
        options = {}
    device = TelemetryClient(
        TelemetrySettings(
            broker=url,
            fleet="secure",
            device_id="intruder",
            state_dir=tmp_path / "device",
            **options,
        )
    ).start()
    device.event("probe")
    time.sleep(3)
    connected = device.connected.is_set()
    depth = device._outbox.depth()
    device.stop(flush_timeout_s=0.5)

    assert not connected
    assert depth >= 1  # kept, not lost, until a connection is allowed
