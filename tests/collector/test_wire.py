"""The collector's MQTT subscriber, byte for byte, against a fake broker on a real socket."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from collector.wire import (
    MAX_PACKET,
    MqttError,
    Subscriber,
    _varint,
    decode_publish,
    encode_connect,
    encode_pubacks,
    encode_subscribe,
    split_packets,
)


def publish_packet(
    topic: str, payload: bytes, packet_id: int, version: int = 5, retain: bool = False
) -> bytes:
    body = struct.pack("!H", len(topic)) + topic.encode() + struct.pack("!H", packet_id)
    if version == 5:
        body += b"\x02\x01\x01"  # properties: payload format indicator = 1 (UTF-8)
    body += payload
    return bytes([0x32 | int(retain)]) + _varint(len(body)) + body


def test_connect_bytes_v5_with_session_and_credentials():
    packet = encode_connect(
        "c1",
        5,
        30,
        clean_start=False,
        session_expiry=3600,
        receive_maximum=2000,
        username="u",
        password="p",
    )

    assert packet == (
        b"\x10\x1d"  # CONNECT, remaining length 29
        b"\x00\x04MQTT\x05"  # protocol name and level 5
        b"\xc0"  # flags: username, password, no clean start
        b"\x00\x1e"  # keep-alive 30
        b"\x08\x11\x00\x00\x0e\x10\x21\x07\xd0"  # session expiry 3600, receive maximum 2000
        b"\x00\x02c1\x00\x01u\x00\x01p"
    )


def test_connect_subscribe_and_puback_bytes_v311():
    assert (
        encode_connect("c", 4, 15, clean_start=True, session_expiry=0, receive_maximum=10)
        == b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x0f\x00\x01c"
    )
    assert encode_subscribe(7, "a/#", 1, 4) == b"\x82\x08\x00\x07\x00\x03a/#\x01"
    assert encode_subscribe(7, "a/#", 1, 5) == b"\x82\x09\x00\x07\x00\x00\x03a/#\x01"
    assert encode_pubacks([1, 258]) == b"\x40\x02\x00\x01\x40\x02\x01\x02"


def test_packets_split_across_reads_are_reassembled():
    stream = publish_packet("t/1", b"x" * 200, 1) + publish_packet("t/2", b"yz", 2)
    buffer = bytearray()
    found = []
    for byte in stream:  # the worst case: one byte per read
        buffer.append(byte)
        packets, used, oversized = split_packets(buffer)
        assert oversized is None
        del buffer[:used]
        found.extend(packets)

    publishes = [decode_publish(flags, body, 5) for _, flags, body in found]
    assert [(p.topic, p.payload, p.packet_id, p.qos) for p in publishes] == [
        ("t/1", b"x" * 200, 1, 1),
        ("t/2", b"yz", 2, 1),
    ]
    assert not buffer


def test_a_broken_length_is_refused():
    with pytest.raises(MqttError, match="remaining length"):
        split_packets(bytearray(b"\x30\xff\xff\xff\xff\x01"))


class FakeBroker:
    """Accepts one connection and plays a script: expect these bytes, send those."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.received = bytearray()
        self.connection: socket.socket | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.connection, _ = self.server.accept()
        self.ready.set()

    def expect(self, count: int) -> bytes:
        self.ready.wait(5)
        self.connection.settimeout(5)
        while len(self.received) < count:
            self.received += self.connection.recv(4096)
        data, self.received = bytes(self.received[:count]), self.received[count:]
        return data

    def send(self, data: bytes) -> None:
        self.connection.sendall(data)

    def close(self) -> None:
        if self.connection:
            self.connection.close()
        self.server.close()


def _connect(broker: FakeBroker, connack: bytes = b"\x20\x03\x01\x00\x00") -> Subscriber:
    subscriber = Subscriber("127.0.0.1", broker.port, "collector-1", keepalive=30)
    worker = threading.Thread(
        target=lambda: (
            broker.expect(len(encode_connect("collector-1", 5, 30, False, 3600, 2000))),
            broker.send(connack),
        )
    )
    worker.start()
    try:
        subscriber.connect(timeout=5)
    finally:
        worker.join()
    return subscriber


def test_session_subscribe_read_and_batched_acks_against_a_fake_broker():
    broker = FakeBroker()
    subscriber = _connect(broker)
    assert subscriber.session_present

    sent = threading.Thread(target=lambda: broker.send(b"\x90\x04\x00\x01\x00\x01"))
    sent.start()
    subscriber.subscribe("$share/g/edgepack/v1/+/+/+")
    sent.join()
    assert broker.expect(len(encode_subscribe(1, "$share/g/edgepack/v1/+/+/+", 1, 5))) == (
        encode_subscribe(1, "$share/g/edgepack/v1/+/+/+", 1, 5)
    )
    stream = b"".join(publish_packet(f"t/{n}", b"{}", n) for n in (1, 2, 3))
    broker.send(stream[:-3])  # the third packet arrives in two pieces
    first = subscriber.read(10, timeout=1)
    broker.send(stream[-3:])
    second = subscriber.read(10, timeout=1)
    subscriber.ack(first + second)

    assert [m.packet_id for m in first] == [1, 2]
    assert [m.topic for m in second] == ["t/3"]
    assert broker.expect(12) == encode_pubacks([1, 2, 3])
    subscriber.close()
    assert broker.expect(2) == b"\xe0\x00"
    broker.close()


@pytest.mark.parametrize(
    "connack, message",
    [(b"\x20\x03\x00\x87\x00", "reason code 0x87"), (b"\x20\x03\x00\x84\x00", "0x84")],
)
def test_refused_connections_raise(connack, message):
    broker = FakeBroker()
    with pytest.raises(MqttError, match=message):
        _connect(broker, connack)
    broker.close()


def test_refused_subscription_and_closed_connection_raise():
    broker = FakeBroker()
    subscriber = _connect(broker)
    broker.send(b"\x90\x04\x00\x01\x00\x87")
    with pytest.raises(MqttError, match="refused subscription"):
        subscriber.subscribe("edgepack/v1/+/+/+")
    broker.close()
    with pytest.raises(OSError):
        subscriber.read(10, timeout=1)


def test_a_packet_over_the_limit_is_announced_not_buffered():
    big = publish_packet("t/big", b"x" * (MAX_PACKET + 10), 9)
    small = publish_packet("t/1", b"{}", 1)

    packets, used, oversized = split_packets(bytearray(small + big[:1000]))

    body_length = 2 + len("t/big") + 2 + 3 + MAX_PACKET + 10  # topic, packet id, properties
    assert [p[0] for p in packets] == [3]
    assert oversized == (0x32, body_length)
    assert used == len(small) + len(big) - body_length  # the big body starts right after


def test_an_oversized_publish_is_skipped_as_it_streams_and_the_connection_stays():
    broker = FakeBroker()
    subscriber = _connect(broker)
    payload = b'{"schema": 1, "blob": "' + b"y" * (3 * 2**20) + b'"}'
    stream = (
        publish_packet("edgepack/v1/f/d/events", b"{}", 1)
        + publish_packet("edgepack/v1/f/d/events", payload, 2)
        + publish_packet("edgepack/v1/f/d/events", b"[]", 3)
    )
    messages, held = [], []
    for start in range(0, len(stream), 1 << 16):  # 64 KiB at a time, as a socket delivers
        broker.send(stream[start : start + (1 << 16)])
        messages += subscriber.read(10, timeout=0.5, linger=0.05)
        discard = subscriber._discard
        held.append(len(subscriber._buffer) + (len(discard.kept) if discard else 0))
    messages += subscriber.read(10, timeout=1)
    subscriber.ack(messages)

    assert [(m.packet_id, m.size) for m in messages] == [(1, None), (2, len(payload)), (3, None)]
    assert messages[1].payload == payload[: len(messages[1].payload)]
    assert 0 < len(messages[1].payload) <= MAX_PACKET
    assert max(held) <= MAX_PACKET + (1 << 16)  # never the whole 3 MiB
    assert broker.expect(12) == encode_pubacks([1, 2, 3])
    subscriber.close()
    broker.close()


def test_an_oversized_packet_that_is_not_a_publish_is_a_broken_stream():
    broker = FakeBroker()
    subscriber = _connect(broker)
    broker.send(b"\x90" + _varint(MAX_PACKET + 1) + b"\x00" * 100)  # a SUBACK of 256 KiB

    with pytest.raises(MqttError, match="not MQTT"):
        subscriber.read(10, timeout=1)
    broker.close()
