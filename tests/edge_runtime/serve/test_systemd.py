"""sd_notify without systemd: the test binds the datagram socket systemd would, starts a
process with NOTIFY_SOCKET and WATCHDOG_USEC set as systemd sets them, and reads what it
sends."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from edge_runtime.serve.systemd import (
    Watchdog,
    notify,
    notify_ready,
    notify_stopping,
    watchdog_interval_s,
)

REPO = Path(__file__).resolve().parents[3]

# A service that loads for 0.3 s, is healthy for HEALTHY_S after READY, then unhealthy,
# and stops after STOP_AFTER_S.
SERVICE = """
import sys, time
from edge_runtime.serve.systemd import Watchdog, notify_ready, notify_stopping

healthy_s, stop_after_s = float(sys.argv[1]), float(sys.argv[2])
time.sleep(0.3)  # loading and self-testing: nothing is sent yet
ready_at = time.monotonic()
watchdog = Watchdog(lambda: time.monotonic() - ready_at < healthy_s)
notify_ready(status="serving digits")
assert watchdog.start()
time.sleep(stop_after_s)
notify_stopping()
watchdog.stop()
"""


@pytest.fixture
def notify_socket(tmp_path):
    """A bound datagram socket, as systemd's; yields (socket, its NOTIFY_SOCKET value)."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        yield sock, str(path)


def receive(sock: socket.socket, until: str) -> list[tuple[float, str]]:
    """Datagrams with their arrival times, up to and including one holding ``until``."""
    received = []
    while True:
        message = sock.recv(4096).decode()
        received.append((time.monotonic(), message))
        if until in message.split("\n"):
            return received


def test_ready_then_periodic_watchdog_while_healthy_then_stopping(notify_socket):
    sock, address = notify_socket
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "NOTIFY_SOCKET": address,
        "WATCHDOG_USEC": "200000",  # 0.2 s: a ping every 0.1 s
    }
    started = time.monotonic()
    service = subprocess.Popen([sys.executable, "-c", SERVICE, "1.0", "1.8"], env=environment)
    try:
        received = receive(sock, "STOPPING=1")
    finally:
        service.wait(timeout=20)
    assert service.returncode == 0

    (ready_at, ready), *rest = received
    assert ready == "READY=1\nSTATUS=serving digits"
    assert ready_at - started >= 0.3  # not before the models were loaded
    (stopping_at, stopping) = rest.pop()
    assert stopping == "STOPPING=1"
    assert [message for _, message in rest] == ["WATCHDOG=1"] * len(rest)
    pings = [at for at, _ in rest]
    assert 5 <= len(pings) <= 12, pings  # ~1.0 s healthy at one ping per 0.1 s
    gaps = [later - earlier for earlier, later in zip(pings[:-1], pings[1:], strict=True)]
    assert all(0.05 < gap < 0.5 for gap in gaps), gaps
    # Unhealthy from ~1.0 s after READY: no pings in the last ~0.8 s before STOPPING.
    assert stopping_at - pings[-1] > 0.5


def test_abstract_namespace_socket():
    name = f"edgepack-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)

        assert notify_ready(environ={"NOTIFY_SOCKET": f"@{name}"})
        assert notify_stopping("draining\n3 requests", environ={"NOTIFY_SOCKET": f"@{name}"})

        assert sock.recv(4096) == b"READY=1"
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining 3 requests"


def test_outside_systemd_nothing_is_sent_and_nothing_raises(tmp_path, caplog):
    assert not notify("READY=1", environ={})
    assert not notify_ready(environ={"NOTIFY_SOCKET": ""})
    assert watchdog_interval_s({}) is None
    assert not Watchdog(lambda: True, environ={}).start()

    gone = str(tmp_path / "no-such-socket")
    assert not notify_ready(environ={"NOTIFY_SOCKET": gone})
    assert f"could not notify systemd at {gone}" in caplog.text
    assert not notify_ready(environ={"NOTIFY_SOCKET": "vsock:2:1234"})
    assert "NOTIFY_SOCKET=vsock:2:1234 is not a Unix socket" in caplog.text


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for pid 1
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_this_process(environ, interval):
    assert watchdog_interval_s(environ) == interval


def test_a_raising_health_check_counts_as_unhealthy(notify_socket, caplog):
    sock, address = notify_socket
    sock.settimeout(0.5)

    def health() -> bool:
        raise RuntimeError("queue worker died")

    watchdog = Watchdog(health, interval_s=0.05, environ={"NOTIFY_SOCKET": address})
    assert watchdog.start()
    time.sleep(0.3)
    watchdog.stop()

    assert watchdog.pings == 0
    with pytest.raises(TimeoutError):
        sock.recv(4096)
    assert "queue worker died" in caplog.text
    assert "no more systemd watchdog pings" in caplog.text
