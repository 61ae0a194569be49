"""For scripts/bench_serve.py: the processes it measures and drives.

Real ``edge-runtime serve`` processes (started on ``--port 0``, the port read from their
``listening on`` line, as tests/edge_runtime/serve/conftest.py does), llama-cpp-python's
own OpenAI server, and ``wrk`` with a Lua script whose ``done()`` prints one JSON line.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on (https?)://([^\s:]+|\[[^\]]+\]):(\d+)")
SERVING = re.compile(r"serving \S+: (.*)")
WRK_LINE = "WRK_RESULT "


def free_port() -> int:
    """A port nothing listens on now (for servers that cannot report the one they bound)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(method: str, url: str, body: bytes | None = None, headers=None, timeout_s=60.0):
    """One HTTP request with the standard library: (status, body bytes)."""
    host, _, rest = url.removeprefix("http://").partition("/")
    name, _, port = host.rpartition(":")
    connection = http.client.HTTPConnection(name, int(port), timeout=timeout_s)
    try:
        connection.request(method, "/" + rest, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@dataclass
class Server:
    """A server process: its base URL (``http://127.0.0.1:PORT``) and log file."""

    name: str
    process: subprocess.Popen
    log_path: Path
    url: str = ""
    grpc_port: int | None = None
    flags: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def serving_line(self) -> str:
        """What serve logged about batching for its model ("no batching (...)", ...)."""
        found = SERVING.search(self.log)
        return found.group(1) if found else "?"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 30 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)

    def failed(self, what: str) -> RuntimeError:
        return RuntimeError(f"{self.name} {what}; its log ({self.log_path}):\n{self.log[-4000:]}")


def _child_env(folder: Path) -> dict[str, str]:
    """This checkout's packages first, and the child's scratch files under ``folder``."""
    path = os.environ.get("PYTHONPATH", "")
    (folder / "tmp").mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "PYTHONPATH": str(REPO) + (os.pathsep + path if path else ""),
        "TMPDIR": str(folder / "tmp"),
        "EDGEPACK_HOME": str(folder / "edgepack-home"),
    }


def _launch(name: str, command: list[str], folder: Path) -> Server:
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=_child_env(folder), cwd=REPO
        )
    return Server(name, process, log_path)


def _wait(server: Server, url_path: str, timeout_s: float) -> None:
    """Until ``GET url_path`` answers 200 (or the process dies, or time runs out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if call("GET", server.url + url_path, timeout_s=5)[0] == 200:
                return
        except OSError:
            pass
        if server.process.poll() is not None or time.monotonic() > deadline:
            raise server.failed(f"did not answer 200 on {url_path}")
        time.sleep(0.1)


def start_serve(
    name: str, bundle: str, pub: Path, folder: Path, *flags: str, grpc: bool = False
) -> Server:
    """``edge-runtime serve BUNDLE --pubkey PUB FLAGS --port 0``, ready to answer."""
    command = [sys.executable, "-m", "edge_runtime.cli", "serve", bundle, "--pubkey", str(pub)]
    extra = list(flags)
    grpc_port = free_port() if grpc else None
    if grpc_port is not None:
        extra += ["--grpc-port", str(grpc_port)]
    server = _launch(name, [*command, *extra, "--port", "0"], folder)
    server.grpc_port, server.flags = grpc_port, list(flags)
    deadline = time.monotonic() + 300
    while not server.url:
        found = LISTENING.search(server.log)
        if found:
            server.url = f"http://{found.group(2)}:{found.group(3)}"
        elif server.process.poll() is not None or time.monotonic() > deadline:
            raise server.failed("did not start")
        else:
            time.sleep(0.05)
    _wait(server, "/v2/health/ready", 300)
    return server


def start_llama_server(
    gguf: Path, alias: str, threads: int, context: int, folder: Path, seed: int
) -> Server:
    """llama-cpp-python's OpenAI server (``python -m llama_cpp.server``) on ``gguf``, with
    the runtime's llama.cpp settings: threads, batch threads, n_ctx and n_batch."""
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf)]
    command += ["--model_alias", alias, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    command += ["--n_ctx", str(context), "--n_batch", str(min(512, context))]
    command += ["--n_gpu_layers", "0", "--seed", str(seed), "--verbose", "False"]
    server = _launch("llama-cpp-server", command, folder)
    server.url = f"http://127.0.0.1:{port}"
    _wait(server, "/v1/models", 300)
    return server


def counter(url: str, metric: str, model: str) -> float:
    """One sample of serve's /metrics, e.g. ``edgepack_serve_batch_size_sum`` (0 if absent)."""
    status, body = call("GET", url + "/metrics")
    if status != 200:
        raise RuntimeError(f"GET {url}/metrics answered {status}: {body[:200]!r}")
    pattern = re.compile(rf'^{re.escape(metric)}\{{model="{re.escape(model)}"\}} (\S+)$', re.M)
    found = pattern.search(body.decode())
    return float(found.group(1)) if found else 0.0


def ensure_wrk(note) -> str:
    """The path of ``wrk``; installed from Debian's packages when missing and root."""
    found = shutil.which("wrk")
    if found:
        return found
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        note("wrk is missing: apt-get install -y wrk")
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT}
        if subprocess.run(["apt-get", "install", "-y", "wrk"], **quiet).returncode != 0:
            subprocess.run(["apt-get", "update"], **quiet)
            subprocess.run(["apt-get", "install", "-y", "wrk"], **quiet)
        found = shutil.which("wrk")
        if found:
            return found
    raise SystemExit(
        "bench_serve needs the load generator wrk: install it with "
        "`sudo apt-get install -y wrk` (Debian, Ubuntu), then run this again; "
        "or leave out (b) and (d) with --only a,c"
    )


WRK_SCRIPT = """\
wrk.method = "POST"
local file = assert(io.open(%(body)s, "rb"))
wrk.body = file:read("*a")
file:close()
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(marker)s{"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p95_us": %%d, '
    .. '"p99_us": %%d, "max_us": %%d, "connect": %%d, "read": %%d, "write": %%d, '
    .. '"status": %%d, "timeout": %%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def lua_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_wrk_script(folder: Path, name: str, body: bytes, headers: dict[str, str]) -> Path:
    """A Lua script that POSTs ``body`` with ``headers`` and reports as one JSON line."""
    body_path, script = folder / f"{name}.body", folder / f"{name}.lua"
    body_path.write_bytes(body)
    lines = "\n".join(f"wrk.headers[{lua_quote(k)}] = {lua_quote(v)}" for k, v in headers.items())
    values = {"body": lua_quote(str(body_path)), "headers": lines, "marker": WRK_LINE}
    script.write_text(WRK_SCRIPT % values)
    return script


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: requests, seconds, latency percentiles (ms) and errors."""

    connections: int
    requests: int
    seconds: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int  # connect, read, write, timeouts, and answers with status >= 400

    @property
    def rate(self) -> float:
        """Successful requests per second."""
        return (self.requests - self.errors) / self.seconds


def parse_wrk(output: str, connections: int) -> WrkResult:
    """The JSON line the script's ``done()`` printed, as a WrkResult."""
    line = next((x for x in output.splitlines() if x.startswith(WRK_LINE)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result line:\n{output[-2000:]}")
    data = json.loads(line.removeprefix(WRK_LINE))
    errors = sum(data[key] for key in ("connect", "read", "write", "status", "timeout"))
    return WrkResult(
        connections,
        data["requests"],
        data["duration_us"] / 1e6,
        data["p50_us"] / 1000,
        data["p95_us"] / 1000,
        data["p99_us"] / 1000,
        errors,
    )


def run_wrk(wrk: str, script: Path, url: str, connections: int, seconds: float) -> WrkResult:
    """``wrk`` with one thread (the load generator shares the server's cores, so it should
    take as little of them as it can) and ``connections`` keep-alive connections."""
    command = [wrk, "-t", "1", "-c", str(connections), "-d", f"{seconds:g}s"]
    command += ["--timeout", "30s", "-s", str(script), url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr[-2000:]}")
    return parse_wrk(done.stdout, connections)
