"""``edge-runtime serve`` as a process: access (API key, refusing an open bind), overload
(a bounded queue answering 503 at once, memory flat), SIGTERM (in-flight requests finish,
exit 0), slow clients (header and body timeouts), TLS, bundles refused before binding,
and fleet telemetry as ``agent`` reports it."""

from __future__ import annotations

import datetime
import io
import ipaddress
import json
import re
import socket
import ssl
import threading
import time

import numpy as np
import pytest
import tritonclient.http as triton_http

from edge_runtime.telemetry.protocol import Kind
from tests.edge_runtime.hostile import MODEL, VECTORS, read_files, signed_bundle
from tests.edge_runtime.telemetry.test_client import Listener

from .conftest import call, run_edge_runtime

API_KEY = "k" * 8 + "0123456789abcdef"
IMAGE = {
    "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.5] * 64}]
}


def infer_digits(url: str, headers: dict[str, str] | None = None):
    body = json.dumps(IMAGE).encode()
    return call("POST", f"{url}/v2/models/digits-cnn/infer", body, headers)


def minilm_body(minilm_example, rows: int = 1) -> tuple[bytes, dict[str, str]]:
    """A binary infer request for MiniLM, as tritonclient sends it."""
    with np.load(minilm_example.eval) as data:
        arrays = {name: data[name][:rows] for name in data.files}
    header = {
        "inputs": [
            {
                "name": name,
                "datatype": "INT64",
                "shape": list(value.shape),
                "parameters": {"binary_data_size": value.nbytes},
            }
            for name, value in arrays.items()
        ],
        "parameters": {"binary_data_output": True},
    }
    text = json.dumps(header).encode()
    raw = b"".join(value.astype("<i8").tobytes() for value in arrays.values())
    return text + raw, {"Inference-Header-Content-Length": str(len(text))}


# -- access ------------------------------------------------------------------------------
def test_without_the_key_everything_but_health_is_401(serve, cnn_bundle, keypair, tmp_path):
    key_file = tmp_path / "api.key"
    key_file.write_text(API_KEY + "\n")
    served = serve(cnn_bundle, "--pubkey", keypair[1], "--api-key-file", key_file)
    good = {"Authorization": f"Bearer {API_KEY}"}

    assert call("GET", f"{served.url}/v2/health/live").status == 200
    assert call("GET", f"{served.url}/v2/health/ready").status == 200
    for path in ("/v2", "/v2/models/digits-cnn", "/metrics"):
        refused = call("GET", f"{served.url}{path}")
        assert refused.status == 401, path
        assert "missing or wrong API key" in refused.json()["error"]
        assert refused.headers["www-authenticate"] == "Bearer"
    wrong = infer_digits(served.url, {"Authorization": "Bearer " + "x" * 24})
    assert wrong.status == 401
    assert infer_digits(served.url, good).status == 200
    client = triton_http.InferenceServerClient(served.url.removeprefix("http://"))
    assert client.get_model_metadata("digits-cnn", headers=good)["name"] == "digits-cnn"


def test_a_non_loopback_bind_without_a_key_is_refused_in_one_line(cnn_bundle, keypair):
    result = run_edge_runtime("serve", cnn_bundle, "--pubkey", keypair[1], "--host", "0.0.0.0")

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: refusing to serve on 0.0.0.0 without an API key: anyone who can reach it "
        "could use the models; give --api-key-file FILE, bind --host 127.0.0.1, or pass "
        "--insecure-no-auth"
    ]


def test_insecure_no_auth_serves_a_non_loopback_bind(serve, cnn_bundle, keypair):
    served = serve(cnn_bundle, "--pubkey", keypair[1], "--host", "0.0.0.0", "--insecure-no-auth")

    assert infer_digits(served.url.replace("0.0.0.0", "127.0.0.1")).status == 200


@pytest.mark.parametrize(
    ("make_args", "words"),
    [
        (lambda tmp, bundle: ["--api-key-file", tmp / "absent"], "cannot read the API key file"),
        (
            lambda tmp, bundle: ["--api-key-file", _write(tmp / "short", "abc")],
            "must be one word of at least 16 characters",
        ),
        (lambda tmp, bundle: [bundle], "are both named 'digits-cnn'; name one of them"),
        (lambda tmp, bundle: ["x/y=" + str(bundle)], "cannot be a URL path segment"),
        (lambda tmp, bundle: [tmp / "absent.edgepkg"], "absent.edgepkg does not exist"),
        (
            lambda tmp, bundle: ["--tls-certfile", tmp / "c.pem", "--tls-keyfile", tmp / "k.pem"],
            "TLS file",
        ),
    ],
    ids=["no-key-file", "short-key", "same-name", "bad-name", "no-bundle", "no-tls-files"],
)
def test_what_cannot_work_is_refused_before_binding(
    cnn_bundle, keypair, tmp_path, make_args, words
):
    args = make_args(tmp_path, cnn_bundle)

    result = run_edge_runtime("serve", cnn_bundle, "--pubkey", keypair[1], *args)

    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1 and words in result.stderr


def test_a_bundle_signed_by_another_key_is_refused(cnn_bundle, other_keypair):
    result = run_edge_runtime("serve", cnn_bundle, "--pubkey", other_keypair[1])

    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and "signature" in result.stderr


def _write(path, text):
    path.write_text(text)
    return path


# -- overload -----------------------------------------------------------------------------
def burst(url: str, body: bytes, headers: dict[str, str], clients: int) -> list:
    """``clients`` requests at once, each on its own connection: (status, Retry-After,
    seconds, error) per request."""
    start = threading.Barrier(clients)
    answers: list = [None] * clients

    def one(index: int) -> None:
        start.wait()
        began = time.perf_counter()
        answer = call("POST", f"{url}/v2/models/minilm/infer", body, headers)
        error = answer.json()["error"] if answer.status != 200 else None
        retry = answer.headers.get("retry-after")
        answers[index] = (answer.status, retry, time.perf_counter() - began, error)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return answers


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_a_full_queue_answers_503_with_retry_after_at_once_and_memory_stays_flat(
    serve, minilm_bundle, minilm_example, keypair
):
    served = serve(
        f"minilm={minilm_bundle}", "--pubkey", keypair[1], "--queue-size", 4, "--max-batch-size", 1
    )
    body, headers = minilm_body(minilm_example)
    burst(served.url, body, headers, 8)  # warm up: the engine's buffers, the thread pool

    first = burst(served.url, body, headers, 32)
    rss_first = served.rss_mb()
    second = burst(served.url, body, headers, 32)
    rss_second = served.rss_mb()

    for answers in (first, second):
        statuses = [status for status, *_ in answers]
        assert set(statuses) <= {200, 503}, answers
        assert statuses.count(200) >= 5  # the running request and the 4 queued
        refused = [answer for answer in answers if answer[0] == 503]
        assert len(refused) >= 8, statuses
        for _, retry_after, _, error in refused:
            assert int(retry_after) >= 1
            assert "has 4 requests waiting, its limit" in error
    # The server's own clock on the refusal path: from the request's arrival to its 503.
    text = call("GET", f"{served.url}/metrics").text
    count = metric(text, 'edgepack_serve_rejected_seconds_count{model="minilm"}')
    fast = metric(text, 'edgepack_serve_rejected_seconds_bucket{le="0.05",model="minilm"}')
    assert count >= 16
    assert fast >= 0.9 * count, text  # a loaded 2-core host may delay a few
    refused_seconds = sorted(seconds for status, _, seconds, _ in first + second if status == 503)
    assert refused_seconds[len(refused_seconds) // 2] < 1.0  # as the clients saw it
    assert rss_second - rss_first < 20, (rss_first, rss_second)
    assert served.process.poll() is None


# -- SIGTERM ------------------------------------------------------------------------------
def test_sigterm_lets_in_flight_requests_finish_then_exits_0(
    serve, minilm_bundle, minilm_example, keypair
):
    served = serve(f"minilm={minilm_bundle}", "--pubkey", keypair[1], "--drain-s", 30)
    body, headers = minilm_body(minilm_example, rows=8)
    sent = threading.Barrier(7)
    answers: list = []

    def one() -> None:
        connection = socket.create_connection(("127.0.0.1", served.port))
        connection.close()
        sent.wait()
        answers.append(call("POST", f"{served.url}/v2/models/minilm/infer", body, headers).status)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for thread in threads:
        thread.start()
    sent.wait()
    time.sleep(0.3)  # the requests are in: connected, sent, queued or running

    code = served.stop()
    for thread in threads:
        thread.join(timeout=60)

    assert code == 0, served.log[-3000:]
    assert answers == [200] * 6
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", served.port), timeout=2)


# -- slow clients -------------------------------------------------------------------------
def test_slow_headers_are_cut_off_and_a_slow_body_gets_408(serve, cnn_bundle, keypair):
    served = serve(
        cnn_bundle, "--pubkey", keypair[1], "--header-timeout-s", 0.5, "--read-timeout-s", 0.5
    )
    trickle = socket.create_connection(("127.0.0.1", served.port))
    trickle.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # never finished
    slow_body = socket.create_connection(("127.0.0.1", served.port))
    slow_body.sendall(
        b"POST /v2/models/digits-cnn/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
        + b'{"inputs": '
    )
    time.sleep(1.5)
    trickle.settimeout(5)
    slow_body.settimeout(5)

    cut = trickle.recv(1024)
    answer = slow_body.recv(4096)

    assert cut == b""  # closed without an answer
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"did not arrive within 0.5 s (--read-timeout-s)" in answer
    assert infer_digits(served.url).status == 200


# -- TLS --------------------------------------------------------------------------------
def self_signed(folder):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_serves_https_only(serve, cnn_bundle, keypair, tmp_path):
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(cafile=str(cert))

    served = serve(
        cnn_bundle,
        "--pubkey",
        keypair[1],
        "--tls-certfile",
        cert,
        "--tls-keyfile",
        key,
        context=context,
    )

    assert served.url.startswith("https://")
    answer = call(
        "POST",
        f"{served.url}/v2/models/digits-cnn/infer",
        json.dumps(IMAGE).encode(),
        context=context,
    )
    assert answer.status == 200
    with pytest.raises(OSError):
        call("GET", served.url.replace("https://", "http://") + "/v2/health/live", timeout_s=5)


# -- telemetry ----------------------------------------------------------------------------
def test_with_a_fleet_it_reports_as_agent_does(serve, cnn_bundle, keypair, mosquitto, tmp_path):
    listener = Listener(mosquitto.port)
    try:
        served = serve(
            cnn_bundle,
            "--pubkey",
            keypair[1],
            "--broker",
            mosquitto.url,
            "--fleet",
            "plant-7",
            "--device-id",
            "pi-1",
            "--metrics-interval-s",
            0.2,
            "--state-dir",
            tmp_path / "state",
        )
        for _ in range(3):
            assert infer_digits(served.url).status == 200
        births = listener.wait_for(Kind.BIRTH, lambda found: any(b["bundle"] for b in found))
        listener.wait_for(Kind.METRICS, lambda found: sum(m["inferences"] for m in found) >= 3)
        events = listener.wait_for(Kind.EVENTS, lambda found: len(found) >= 2)
        assert served.stop() == 0
        statuses = listener.wait_for(
            Kind.STATUS, lambda found: any(s["reason"] == "shutdown" for s in found)
        )
    finally:
        listener.close()

    assert [b for b in births if b["bundle"]][-1]["bundle"]["name"] == "digits-cnn"
    assert {"bundle_loaded", "selftest"} <= {event["event"] for event in events}
    assert statuses[-1]["state"] == "offline"


# -- bundles that verify but cannot be served -------------------------------------------------
def test_a_model_the_engine_cannot_load_stops_serve_with_one_line(cnn_bundle, keypair, tmp_path):
    bundle = signed_bundle(
        read_files(cnn_bundle), keypair[0], tmp_path / "b.edgepkg", replace={MODEL: b"not onnx"}
    )

    result = run_edge_runtime("serve", bundle, "--pubkey", keypair[1])

    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model/model.onnx" in errors[0], result.stderr


def test_a_model_failing_its_self_test_is_not_ready_and_says_why(
    serve, cnn_bundle, keypair, tmp_path
):
    files = read_files(cnn_bundle)
    with np.load(io.BytesIO(files[VECTORS])) as stored:
        arrays = {
            name: -value if name.startswith(("reference.", "alternate.")) else value
            for name, value in stored.items()
        }
    vectors = io.BytesIO()
    np.savez(vectors, **arrays)
    bundle = signed_bundle(
        files, keypair[0], tmp_path / "b.edgepkg", replace={VECTORS: vectors.getvalue()}
    )

    served = serve(bundle, "--pubkey", keypair[1], ready=False)
    deadline = time.monotonic() + 60
    while "failed its self-test" not in served.log and time.monotonic() < deadline:
        time.sleep(0.1)

    assert "model 'digits-cnn' failed its self-test" in served.log
    assert call("GET", f"{served.url}/v2/health/live").status == 200
    assert call("GET", f"{served.url}/v2/health/ready").status == 503
    assert call("GET", f"{served.url}/v2/models/digits-cnn/ready").json() == {
        "name": "digits-cnn",
        "ready": False,
    }
    refused = infer_digits(served.url)
    assert refused.status == 503
    assert "is not ready: model 'digits-cnn' failed its self-test" in refused.json()["error"]
    assert refused.headers["retry-after"] == "1"
    assert served.stop() == 0
