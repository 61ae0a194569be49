"""scripts/_bench_serve_procs.py: wrk driven by its Lua script against a real HTTP server,
and the refusals of scripts/bench_serve.py a user can cause."""

from __future__ import annotations

import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import _bench_serve_procs as procs  # noqa: E402  (after the path is set)
import bench_serve  # noqa: E402

BODY = b'{"inputs": []}\x00\x01binary\xff'
HEADERS = {"Inference-Header-Content-Length": "14", "Content-Type": "application/octet-stream"}


@pytest.fixture
def http_server():
    """A real HTTP server on a free port; POST answers ``status[0]``, and records bodies."""
    status, seen = [200], []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((body, self.headers.get("Inference-Header-Content-Length")))
            self.send_response(status[0])
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/infer", status, seen
    server.shutdown()
    thread.join(timeout=10)
    server.server_close()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is missing (apt-get install wrk)")
def test_wrk_posts_the_body_and_reports_requests_and_errors(http_server, tmp_path):
    # setup
    url, status, seen = http_server
    script = procs.write_wrk_script(tmp_path, "body", BODY, HEADERS)
    # execute
    good = procs.run_wrk(shutil.which("wrk"), script, url, 2, 1)
    status[0] = 503
    bad = procs.run_wrk(shutil.which("wrk"), script, url, 2, 1)
    # assert
    assert seen and all(entry == (BODY, "14") for entry in seen)
    assert good.requests > 0 and good.errors == 0 and good.rate > 0
    assert 0 < good.p50_ms <= good.p95_ms <= good.p99_ms
    assert 0.9 < good.seconds < 2
    assert bad.requests > 0 and bad.errors == bad.requests and bad.rate == 0


def test_parse_wrk_without_its_line_says_so():
    with pytest.raises(RuntimeError, match="wrk printed no result line"):
        procs.parse_wrk("Running 1s test @ http://127.0.0.1:1/\n", 1)


def test_missing_wrk_without_root_says_how_to_install(monkeypatch):
    monkeypatch.setattr(procs.shutil, "which", lambda name: None)
    monkeypatch.setattr(procs.os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit, match=r"sudo apt-get install -y wrk.*--only a,c"):
        procs.ensure_wrk(lambda message: None)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--only", "a,x"], "--only takes parts among a, b, c, d"),
        (["--only", ","], "--only takes parts among a, b, c, d"),
        (["--seconds", "0"], "--seconds must be at least 1"),
    ],
)
def test_bad_options_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_serve.main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
