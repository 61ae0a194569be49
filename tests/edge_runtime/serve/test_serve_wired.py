"""The real `edge-runtime serve` process with its gRPC front end and systemd notifications
wired in: tritonclient.grpc against --grpc-port, and READY=1 / WATCHDOG=1 read from the
NOTIFY_SOCKET systemd would give it."""

from __future__ import annotations

import socket
import time
import uuid

import numpy as np
import pytest

from edge_runtime.runtime import Runtime
from tests.edge_runtime.serve.conftest import call


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / f"notify-{uuid.uuid4().hex[:8]}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    yield sock, path
    sock.close()


def _messages(sock) -> list[str]:
    received = []
    while True:
        try:
            received.append(sock.recv(4096).decode())
        except TimeoutError:
            return received


def test_grpc_and_systemd_in_the_served_process(
    serve, cnn_bundle, keypair, notify_socket, digits_example
):
    import tritonclient.grpc as grpcclient

    sock, path = notify_socket
    port = _free_port()
    served = serve(
        f"digits={cnn_bundle}",
        "--pubkey",
        keypair[1],
        "--grpc-port",
        port,
        ready=False,
        env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"},
    )
    # READY=1 comes only once the model is loaded and self-tested: /v2/health/ready is
    # 200 by the time it arrives.
    deadline = time.monotonic() + 120
    ready_seen = False
    while not ready_seen and time.monotonic() < deadline:
        for message in _messages(sock):
            if message.startswith("READY=1"):
                ready_seen = True
                assert call("GET", f"{served.url}/v2/health/ready").status == 200
        assert served.process.poll() is None, served.log[-4000:]
    assert ready_seen, served.log[-4000:]
    time.sleep(1.0)
    pings = [m for m in _messages(sock) if m == "WATCHDOG=1"]
    assert len(pings) >= 3, pings  # every 0.2 s while the serving loop ticks

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits")
    data = np.load(digits_example.eval)
    images = data[next(k for k in data.files if k != "labels")][:4].astype(np.float32)
    request = grpcclient.InferInput("image", list(images.shape), "FP32")
    request.set_data_from_numpy(images)
    result = client.infer("digits", [request]).as_numpy("logits")
    with Runtime.open(cnn_bundle, keypair[1]) as runtime:
        expected = runtime.run({"image": images})["logits"]
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)
    client.close()

    assert served.stop() == 0
    assert any(m.startswith("STOPPING=1") for m in _messages(sock))


@pytest.mark.slow
def test_the_openai_client_against_a_served_process(
    serve, minilm_text_bundle, smollm2_x86_bundle, keypair
):
    """One serve process with an embedding bundle (MiniLM with its tokenizer) and a
    language model (SmolLM2): the official openai client's embeddings (its default
    base64 and float), chat and streamed chat; OIP v2 still serves the tensor model."""
    import openai

    served = serve(
        f"minilm={minilm_text_bundle}", f"smollm2={smollm2_x86_bundle}", "--pubkey", keypair[1]
    )
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    sentences = ["A cat sits on the mat.", "Edge devices run models offline."]

    assert {model.id for model in client.models.list()} == {"minilm", "smollm2"}
    default = client.embeddings.create(model="minilm", input=sentences)  # base64 on the wire
    floats = client.embeddings.create(model="minilm", input=sentences, encoding_format="float")
    with Runtime.open(minilm_text_bundle, keypair[1]) as runtime:
        expected = runtime.embed(sentences)
    for answer in (default, floats):
        got = np.array([item.embedding for item in answer.data], dtype=np.float32)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert default.usage.prompt_tokens > 0

    chat = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8,
        temperature=0,
    )
    assert chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=10**9
        )
    assert call("GET", f"{served.url}/v2/models/minilm/ready").status == 200
    assert served.stop() == 0


def test_minilm_over_grpc_equals_runtime_run(serve, minilm_bundle, keypair, minilm_example):
    """The transformer over tritonclient.grpc: three INT64 inputs sent raw, the per-token
    output equal to Runtime.run on the same tokens."""
    import tritonclient.grpc as grpcclient

    port = _free_port()
    serve(f"minilm={minilm_bundle}", "--pubkey", keypair[1], "--grpc-port", port)
    with np.load(minilm_example.eval) as data:
        feeds = {name: data[name][:2].astype(np.int64) for name in data.files}
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    metadata = client.get_model_metadata("minilm", as_json=True)
    assert {tensor["name"] for tensor in metadata["inputs"]} == set(feeds)
    inputs = []
    for name, value in feeds.items():
        tensor = grpcclient.InferInput(name, list(value.shape), "INT64")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    result = client.infer("minilm", inputs)
    client.close()
    with Runtime.open(minilm_bundle, keypair[1]) as runtime:
        expected = runtime.run(feeds)
    for name, value in expected.items():
        np.testing.assert_allclose(result.as_numpy(name), value, rtol=1e-5, atol=1e-5)
