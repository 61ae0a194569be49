"""A real ``edge-runtime serve`` process on a free port, and the bundles it serves.

The server is started with ``--port 0``; the port it bound is read from its
``listening on`` line, so two test runs never race for a port.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import build_example

LISTENING = re.compile(r"listening on (https?)://([^\s:]+|\[[^\]]+\]):(\d+)")


@pytest.fixture(scope="session")
def minilm_bundle(minilm_example, keypair, tmp_path_factory) -> Path:
    """MiniLM int8 for x86-64-avx2 (dynamic quantization: quick to build, never batched)."""
    output = tmp_path_factory.mktemp("bundles") / "minilm-x86.edgepkg"
    build_example(
        minilm_example, keypair[0], output, "x86-64-avx2", recipe="int8-dynamic-per-channel"
    )
    return output


@dataclass
class Answer:
    """An HTTP answer: status, headers (lower-case names), body."""

    status: int
    headers: dict[str, str]
    content: bytes

    def json(self):
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


def call(
    method: str,
    url: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
    timeout_s: float = 60.0,
) -> Answer:
    """One HTTP request with the standard library (raw bytes in, raw bytes out); an
    iterable body is sent chunked, without a Content-Length."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout_s, context=context
        )
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        chunked = body is not None and not isinstance(body, bytes)
        connection.request(
            method,
            parts.path + (f"?{parts.query}" if parts.query else ""),
            body=body,
            headers=headers or {},
            encode_chunked=chunked,
        )
        response = connection.getresponse()
        content = response.read()
        found = {name.lower(): value for name, value in response.getheaders()}
        return Answer(response.status, found, content)
    finally:
        connection.close()


@dataclass
class Served:
    """A running server: its URL, process and log."""

    process: subprocess.Popen
    log_path: Path
    url: str = ""
    port: int = 0

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGUSR1)  # every thread's stack, into the log
            time.sleep(0.5)
            self.process.kill()
            raise AssertionError(f"serve did not stop on SIGTERM:\n{self.log[-6000:]}") from None

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def edge_runtime_command() -> list[str]:
    script = Path(sys.executable).with_name("edge-runtime")
    return [str(script)] if script.exists() else [sys.executable, "-m", "edge_runtime.cli"]


class Launcher:
    """Starts ``edge-runtime serve`` processes with their files under ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "tmp").mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "TMPDIR": str(folder / "tmp"),
            "EDGEPACK_HOME": str(folder / "edgepack-home"),
        }
        self.started: list[Served] = []

    def start(
        self,
        *args: object,
        ready: bool = True,
        timeout_s: float = 180.0,
        env: dict[str, str] | None = None,
        context: ssl.SSLContext | None = None,
    ) -> Served:
        """``edge-runtime serve ARGS --port 0``; waits for its port and, with ``ready``,
        for /v2/health/ready."""
        log_path = self.folder / f"serve-{len(self.started)}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [*edge_runtime_command(), "serve", *map(str, args), "--port", "0"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, **(env or {})},
            )
        served = Served(process, log_path)
        self.started.append(served)
        deadline = time.monotonic() + timeout_s
        while not served.url:
            match = LISTENING.search(served.log)
            if match:
                scheme, host, port = match.groups()
                served.port = int(port)
                served.url = f"{scheme}://{host}:{port}"
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve did not start:\n{served.log[-6000:]}")
            time.sleep(0.05)
        while ready:
            try:
                if call("GET", f"{served.url}/v2/health/ready", context=context).status == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve did not get ready:\n{served.log[-6000:]}")
            time.sleep(0.1)
        return served

    def kill_all(self) -> None:
        for served in self.started:
            if served.process.poll() is None:
                served.process.kill()
                served.process.wait(timeout=30)


@pytest.fixture
def serve(tmp_path):
    """``serve(*args)``: a server for this test (``Launcher.start``), killed after it."""
    launcher = Launcher(tmp_path / "serve")
    yield launcher.start
    launcher.kill_all()


def run_edge_runtime(*args: object, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    """``edge-runtime ARGS`` to completion (for refusals)."""
    return subprocess.run(
        [*edge_runtime_command(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
