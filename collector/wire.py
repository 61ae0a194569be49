"""A lean MQTT subscriber for the collector's bulk ingest (MQTT 5 or 3.1.1, QoS 1).

Why not paho here: paho-mqtt handles one packet per loop turn with several small reads
and a callback each, and measured ~8-13k messages/s on a 2-core host, below the 20k/s a
single collector must sustain (see docs/benchmarks.md). This client does only what a
collector needs: CONNECT with a persistent session, SUBSCRIBE (shared groups too), read
PUBLISH packets in large chunks, and send the PUBACKs of a whole stored batch in one write,
after the batch commits. Devices keep using paho (edge_runtime.telemetry.client).

Malformed packets or a refused CONNECT/SUBSCRIBE raise ``MqttError``; socket trouble raises
``OSError``. The caller reconnects. A PUBLISH larger than ``MAX_PACKET`` is no reason to
drop the connection (the broker would redeliver it on every reconnect, for ever): it is
read as it streams in, its start kept and the rest discarded, and handed on with its size,
to be quarantined and acknowledged like any other bad message.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import ssl
import struct
import time
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14
_PROP_SESSION_EXPIRY, _PROP_RECEIVE_MAXIMUM = 0x11, 0x21
# A packet body up to this size is held whole; of a larger PUBLISH only this much is kept
# (the topic, packet id and properties fit in it), and the rest is read and discarded.
MAX_PACKET = 256 * 1024


class MqttError(Exception):
    """The broker refused us, or sent something that is not MQTT."""


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    packet_id: int
    retain: bool
    size: int | None = None  # the whole payload's size when ``payload`` is only its start


@dataclass
class _Discard:
    """A PUBLISH too large to hold: its first MAX_PACKET bytes, and what is still to skip."""

    flags: int
    length: int
    remaining: int
    kept: bytearray


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([(kind << 4) | flags]) + _varint(len(body)) + body


def encode_connect(
    client_id: str,
    version: int,
    keepalive: int,
    clean_start: bool,
    session_expiry: int,
    receive_maximum: int,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    flags = (0x02 if clean_start else 0) | (0x80 if username else 0) | (0x40 if password else 0)
    body = _string("MQTT") + bytes([version, flags]) + struct.pack("!H", keepalive)
    if version == 5:
        props = bytes([_PROP_SESSION_EXPIRY]) + struct.pack("!I", session_expiry)
        props += bytes([_PROP_RECEIVE_MAXIMUM]) + struct.pack("!H", receive_maximum)
        body += _varint(len(props)) + props
    body += _string(client_id)
    if username:
        body += _string(username)
    if password:
        body += _string(password)
    return _packet(CONNECT, 0, body)


def encode_subscribe(packet_id: int, topic_filter: str, qos: int, version: int) -> bytes:
    body = struct.pack("!H", packet_id) + (b"\x00" if version == 5 else b"")
    return _packet(SUBSCRIBE, 0x2, body + _string(topic_filter) + bytes([qos]))


def encode_pubacks(packet_ids: list[int]) -> bytes:
    # Remaining length 2 with no reason code means "success" in MQTT 5 and is 3.1.1's form.
    return b"".join(b"\x40\x02" + struct.pack("!H", pid) for pid in packet_ids)


def _read_varint(data, offset: int) -> tuple[int, int] | None:
    value = shift = 0
    for index in range(offset, min(offset + 4, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    if len(data) - offset >= 4:
        raise MqttError("malformed remaining length")
    return None  # incomplete


def split_packets(
    buffer: bytearray, max_packet: int = MAX_PACKET
) -> tuple[list[tuple[int, int, bytes]], int, tuple[int, int] | None]:
    """Complete packets in ``buffer`` as (type, flags, body), and the bytes they used.

    The third value is ``(header byte, body length)`` when the next packet is larger than
    ``max_packet``; ``used`` then includes its fixed header, so its body starts the rest.
    """
    packets = []
    offset = 0
    while len(buffer) - offset >= 2:
        parsed = _read_varint(buffer, offset + 1)
        if parsed is None:
            break
        length, start = parsed
        header = buffer[offset]
        if length > max_packet:
            return packets, start, (header, length)
        end = start + length
        if end > len(buffer):
            break
        packets.append((header >> 4, header & 0x0F, bytes(buffer[start:end])))
        offset = end
    return packets, offset, None


def decode_publish(flags: int, body: bytes, version: int, length: int | None = None) -> Publish:
    """A PUBLISH from its body; ``length``: the whole body's, when ``body`` is only its start."""
    qos = (flags >> 1) & 0x03
    topic_length = int.from_bytes(body[0:2], "big")
    position = 2 + topic_length
    topic = body[2:position].decode("utf-8", errors="replace")
    packet_id = 0
    if qos:
        packet_id = int.from_bytes(body[position : position + 2], "big")
        position += 2
    if version == 5:
        parsed = _read_varint(body, position)
        if parsed is None:
            raise MqttError("truncated PUBLISH properties")
        properties_length, position = parsed
        position += properties_length
    if length is None:
        return Publish(topic, body[position:], qos, packet_id, bool(flags & 0x01))
    size = length - position
    return Publish(topic, body[position:], qos, packet_id, bool(flags & 0x01), size=size)


class Subscriber:
    """One connection: ``connect``, ``subscribe``, then ``read``/``ack`` in a loop."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        version: int = 5,
        keepalive: int = 30,
        session_expiry: int = 3600,
        receive_maximum: int = 2000,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.host, self.port, self.client_id = host, port, client_id
        self.version, self.keepalive = version, keepalive
        self.session_expiry, self.receive_maximum = session_expiry, receive_maximum
        self.username, self.password = username, password
        self.tls, self.server_hostname = tls, server_hostname or host
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        # (type, flags, body, whole body length if the body was cut, else None)
        self._queued: collections.deque[tuple[int, int, bytes, int | None]] = collections.deque()
        self._discard: _Discard | None = None
        self._last_sent = self._last_heard = time.monotonic()
        self._next_id = 1
        self.session_present = False

    def connect(self, timeout: float = 10.0) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_hostname=self.server_hostname)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._buffer.clear()
        self._queued.clear()
        self._discard = None
        self._send(
            encode_connect(
                self.client_id,
                self.version,
                self.keepalive,
                clean_start=False,
                session_expiry=self.session_expiry,
                receive_maximum=self.receive_maximum,
                username=self.username,
                password=self.password,
            )
        )
        kind, _, body, _ = self._expect(CONNACK, timeout)
        self.session_present = bool(body[0] & 0x01)
        if body[1] != 0:
            raise MqttError(f"broker refused the connection: reason code 0x{body[1]:02x}")

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 10.0) -> None:
        packet_id = self._next_id
        self._next_id = self._next_id % 65535 + 1
        self._send(encode_subscribe(packet_id, topic_filter, qos, self.version))
        _, _, body, _ = self._expect(SUBACK, timeout)
        position = 2
        if self.version == 5:
            parsed = _read_varint(body, position)
            position = parsed[1] + parsed[0] if parsed else len(body)
        codes = bytes(body[position:])
        if not codes or codes[0] >= 0x80:
            raise MqttError(f"broker refused subscription {topic_filter!r}: {codes.hex()}")

    def read(self, max_messages: int, timeout: float, linger: float = 0.002) -> list[Publish]:
        """Up to ``max_messages`` PUBLISH packets; waits at most ``timeout`` for the first.

        Once some have arrived, it keeps reading while more come within ``linger``: a
        stream fills whole batches (one transaction and one PUBACK write each), a trickle
        is stored at once.
        """
        messages: list[Publish] = []
        deadline = time.monotonic() + timeout
        while len(messages) < max_messages:
            if not self._queued:
                wait = linger if messages else max(0.0, deadline - time.monotonic())
                if not self._fill(wait):
                    break
            while self._queued and len(messages) < max_messages:
                kind, flags, body, length = self._queued.popleft()
                if kind == PUBLISH:
                    messages.append(decode_publish(flags, body, self.version, length))
                elif kind == DISCONNECT:
                    reason = body[0] if len(body) else 0
                    raise MqttError(f"broker disconnected us: reason code 0x{reason:02x}")
        self._keep_alive()
        return messages

    def ack(self, messages: list[Publish]) -> None:
        """PUBACK every QoS 1 message in one write (after the batch is stored)."""
        ids = [m.packet_id for m in messages if m.qos == 1]
        if ids:
            self._send(encode_pubacks(ids))

    def ping(self) -> None:
        """Send a PINGREQ if one is due, without reading: for a caller busy elsewhere."""
        if time.monotonic() - self._last_sent > self.keepalive / 2:
            self._send(b"\xc0\x00")

    def close(self) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(OSError):  # closing anyway
            self._send(b"\xe0\x00")  # DISCONNECT: no Will, keep the session
        self._sock.close()
        self._sock = None

    # -- internals -------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        if self._sock is None:
            raise OSError("not connected")
        self._sock.sendall(data)
        self._last_sent = time.monotonic()

    def _fill(self, wait: float) -> bool:
        """Read what the socket has (waiting up to ``wait``); queue complete packets."""
        sock = self._sock
        if sock is None:
            raise OSError("not connected")
        sock.settimeout(wait if wait > 0 else 0.0)
        try:
            chunk = sock.recv(1 << 18)
        except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
            return False
        if not chunk:
            raise OSError("broker closed the connection")
        self._last_heard = time.monotonic()
        self._buffer += chunk
        before = len(self._queued)
        self._split()
        return len(self._queued) > before

    def _split(self) -> None:
        """Move complete packets from the buffer to the queue, skipping an oversized body."""
        while True:
            discard = self._discard
            if discard is not None:
                take = min(discard.remaining, len(self._buffer))
                room = max(0, MAX_PACKET - len(discard.kept))
                discard.kept += self._buffer[: min(take, room)]
                del self._buffer[:take]
                discard.remaining -= take
                if discard.remaining:
                    return
                self._queued.append((PUBLISH, discard.flags, bytes(discard.kept), discard.length))
                self._discard = None
            packets, used, oversized = split_packets(self._buffer)
            del self._buffer[:used]
            self._queued.extend((kind, flags, body, None) for kind, flags, body in packets)
            if oversized is None:
                return
            header, length = oversized
            if header >> 4 != PUBLISH:
                raise MqttError(f"packet of type {header >> 4} and {length} bytes: not MQTT")
            self._discard = _Discard(header & 0x0F, length, length, bytearray())

    def _expect(self, kind: int, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for packet in self._queued:
                if packet[0] == kind:
                    self._queued.remove(packet)
                    return packet
            self._fill(max(0.01, deadline - time.monotonic()))
        raise MqttError(f"no {('CONNACK', 'SUBACK')[kind == SUBACK]} from the broker in {timeout}s")

    def _keep_alive(self) -> None:
        now = time.monotonic()
        if now - self._last_heard > self.keepalive * 1.5:
            raise OSError(f"broker silent for {now - self._last_heard:.0f}s")
        if now - self._last_sent > self.keepalive / 2:
            self._send(b"\xc0\x00")  # PINGREQ; the PINGRESP only refreshes _last_heard
