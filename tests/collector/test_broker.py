"""The embedded broker (amqtt): logins from a password file, and each device on its own topics.

Real MQTT 3.1.1 clients (paho) against the broker on a real port.
"""

from __future__ import annotations

import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner

from collector.broker import EmbeddedBroker, set_password
from collector.cli import cli, main
from collector.errors import CollectorError
from tests.brokers import free_port

PASSWORDS = {"pi-01": "one", "pi-02": "two", "collector": "reads-all"}


@pytest.fixture(scope="module")
def password_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("broker") / "passwd"
    for user, password in PASSWORDS.items():
        set_password(path, user, password)
    return path


@pytest.fixture
def broker(password_file):
    started = EmbeddedBroker(
        "127.0.0.1", free_port(), password_file=password_file, readers=("collector",)
    ).start()
    yield started
    started.stop()


class Client:
    """A paho 3.1.1 client that records what it is told and what it receives."""

    def __init__(self, port, client_id, user=None, password=None, will_topic=None):
        self.received: list[tuple[str, bytes]] = []
        self.granted: list[int] = []
        self.connected = threading.Event()
        self.answered = threading.Event()
        self.refused: str | None = None
        self.subscribed = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id, protocol=mqtt.MQTTv311)
        if user:
            client.username_pw_set(user, password)
        if will_topic:
            client.will_set(will_topic, b'{"state": "offline"}', 1, True)
        client.on_connect = self._on_connect
        client.on_message = lambda c, u, message: self.received.append(
            (message.topic, message.payload)
        )
        client.on_subscribe = self._on_subscribe
        client.connect_async("127.0.0.1", port)
        client.loop_start()
        self.client = client
        assert self.answered.wait(10), "no CONNACK"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.refused = str(reason_code)
            client.disconnect()
        else:
            self.connected.set()
        self.answered.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.granted = [code.value for code in reason_codes]
        self.subscribed.set()

    def subscribe(self, topic: str) -> list[int]:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(10)
        return self.granted

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("user", "password"),
    [(None, None), ("pi-01", "wrong"), ("nobody", "x")],
    ids=["anonymous", "wrong-password", "unknown-user"],
)
def test_a_client_without_a_valid_login_is_refused(broker, user, password):
    client = Client(broker.port, "pi-01", user, password)

    assert client.refused is not None
    assert not client.connected.is_set()
    client.close()


def test_a_device_writes_only_its_own_topics_and_reads_only_its_own_requests(broker):
    collector = Client(broker.port, "edge-collector", "collector", "reads-all")
    device = Client(broker.port, "pi-01", "pi-01", "one")
    try:
        assert collector.subscribe("edgepack/v1/+/+/+") == [1]
        assert device.subscribe("edgepack/v1/#") == [128]  # not the whole fleet
        assert device.subscribe("edgepack/v1/shop/pi-02/cmd") == [128]  # not another's
        assert device.subscribe("edgepack/v1/shop/pi-01/cmd") == [1]

        device.publish("edgepack/v1/shop/pi-02/metrics", b"as pi-02")  # dropped
        device.publish("edgepack/v1/shop/pi-01/cmd", b"to itself")  # dropped: not a device's
        device.publish("edgepack/v1/shop/pi-01/metrics", b"as pi-01")
        collector.publish("edgepack/v1/shop/pi-01/cmd", b"a request")
        wait_for(lambda: len(collector.received) >= 1 and len(device.received) >= 1)
        time.sleep(0.5)  # anything dropped would have arrived by now
    finally:
        collector.close()
        device.close()

    assert sorted(collector.received) == [  # its own request too: it reads every topic
        ("edgepack/v1/shop/pi-01/cmd", b"a request"),
        ("edgepack/v1/shop/pi-01/metrics", b"as pi-01"),
    ]
    assert device.received == [("edgepack/v1/shop/pi-01/cmd", b"a request")]


def test_a_will_on_another_devices_topic_is_refused_at_connect(broker):
    spoof = Client(broker.port, "pi-01", "pi-01", "one", will_topic="edgepack/v1/shop/pi-02/status")
    own = Client(broker.port, "pi-02", "pi-02", "two", will_topic="edgepack/v1/shop/pi-02/status")

    assert spoof.refused is not None
    assert own.connected.is_set()
    spoof.close()
    own.close()


def test_anonymous_clients_are_who_their_client_id_says(tmp_path):
    broker = EmbeddedBroker(
        "127.0.0.1", free_port(), allow_anonymous=True, readers=("edge-collector",)
    ).start()
    collector = Client(broker.port, "edge-collector")
    device = Client(broker.port, "pi-01")
    try:
        assert collector.subscribe("edgepack/v1/+/+/+") == [1]
        device.publish("edgepack/v1/shop/pi-02/events", b"as pi-02")
        device.publish("edgepack/v1/shop/pi-01/events", b"as pi-01")
        wait_for(lambda: len(collector.received) >= 1)
        time.sleep(0.5)
    finally:
        collector.close()
        device.close()
        broker.stop()

    assert collector.received == [("edgepack/v1/shop/pi-01/events", b"as pi-01")]


def test_the_broker_needs_a_password_file_or_leave_to_take_anonymous_clients(tmp_path):
    with pytest.raises(CollectorError, match="refuses anonymous clients: give it a password"):
        EmbeddedBroker("127.0.0.1", free_port())
    with pytest.raises(CollectorError, match="does not exist: make it with edge-collector passwd"):
        EmbeddedBroker("127.0.0.1", free_port(), password_file=tmp_path / "none").start()


def test_passwd_adds_and_replaces_users_with_argon2_hashes(tmp_path, monkeypatch, capsys):
    path = tmp_path / "passwd"

    first = CliRunner().invoke(cli, ["passwd", str(path), "pi-01"], input="a\na\n")
    CliRunner().invoke(cli, ["passwd", str(path), "pi-02", "--password", "b"])
    CliRunner().invoke(cli, ["passwd", str(path), "pi-01", "--password", "c"])
    monkeypatch.setattr(sys, "argv", ["edge-collector", "passwd", str(path), "pi 03"])
    monkeypatch.setenv("EDGE_COLLECTOR_NEW_PASSWORD", "d")
    with pytest.raises(SystemExit) as exit_:
        main()

    assert first.exit_code == 0, first.output
    lines = path.read_text().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["pi-02", "pi-01"]
    assert all(line.split(":", 1)[1].startswith("$argon2") for line in lines)
    assert path.stat().st_mode & 0o777 == 0o600
    assert exit_.value.code == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: user 'pi 03' is not a valid name")
    assert error.endswith("(a device logs in with its device id)")
