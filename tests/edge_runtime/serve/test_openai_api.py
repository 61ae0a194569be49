"""The OpenAI routes (edge_runtime/serve/openai_api.py) with the official ``openai``
client, against a real uvicorn server on a free port: MiniLM (with its tokenizer) for
embeddings, SmolLM2 (GGUF) for chat and completions, and every bad input of issue 14
refused with OpenAI's error object while the server keeps serving."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time

import numpy as np
import openai
import pytest
import uvicorn
from starlette.applications import Starlette

from edge_runtime.runtime import Runtime
from edge_runtime.serve.openai_api import openai_routes
from edge_runtime.serve.text_models import EmbeddingModelHost, LanguageModelHost

MAX_BODY = 1024 * 1024
SENTENCES = ["A cat sits on the mat.", "Stock markets fell sharply on Monday.", "Hello"]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "max_tokens": 8, "seed": 1}


class Server:
    """A uvicorn server for ``app`` on a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive(), "the server thread died"
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0
        )

    def post(self, path: str, body: bytes, headers: dict | None = None):
        """A raw request, for what no client sends: (status, headers, parsed body)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(
                "POST", path, body, {"Content-Type": "application/json", **(headers or {})}
            )
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), json.loads(response.read())
        finally:
            connection.close()


@pytest.fixture(scope="module")
def minilm(minilm_text_bundle, keypair):
    with Runtime.open(minilm_text_bundle, keypair[1]) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def smollm2(smollm2_x86_bundle, keypair):
    with Runtime.open(smollm2_x86_bundle, keypair[1], threads=2) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def server(minilm, smollm2):
    app = Starlette(
        routes=openai_routes(
            {"minilm": EmbeddingModelHost(minilm, "minilm")},
            {"smollm2": LanguageModelHost(smollm2, "smollm2")},
            max_body_bytes=MAX_BODY,
        )
    )
    with Server(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def test_models_are_listed_and_found(client):
    listed = client.models.list()

    assert [model.id for model in listed.data] == ["minilm", "smollm2"]
    assert client.models.retrieve("smollm2").owned_by == "edgepack"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4")
    assert caught.value.body["code"] == "model_not_found"


def test_embeddings_float_and_the_default_base64_equal_runtime_embed(client, server, minilm):
    expected = minilm.embed(SENTENCES)

    as_floats = client.embeddings.create(model="minilm", input=SENTENCES, encoding_format="float")
    by_default = client.embeddings.create(model="minilm", input=SENTENCES)  # asks base64
    one = client.embeddings.create(model="minilm", input=SENTENCES[0])
    status, _, raw = server.post(
        "/v1/embeddings",
        json.dumps({"model": "minilm", "input": SENTENCES, "encoding_format": "base64"}).encode(),
    )

    floats = np.array([item.embedding for item in as_floats.data])
    np.testing.assert_allclose(floats, expected, atol=1e-6)
    np.testing.assert_array_equal(np.array([i.embedding for i in by_default.data]), expected)
    np.testing.assert_array_equal(np.array(one.data[0].embedding), minilm.embed(SENTENCES[:1])[0])
    assert status == 200
    decoded = [np.frombuffer(base64.b64decode(item["embedding"]), "<f4") for item in raw["data"]]
    np.testing.assert_array_equal(np.array(decoded), expected)
    assert [item.index for item in as_floats.data] == [0, 1, 2]
    tokens = minilm.tokenize(SENTENCES).tokens
    assert (as_floats.usage.prompt_tokens, as_floats.usage.total_tokens) == (tokens, tokens)
    assert as_floats.model == "minilm"


def test_chat_whole_and_streamed_with_the_models_template(client, smollm2):
    expected = smollm2.chat(MESSAGES, **GREEDY)
    text = expected.read()

    whole = client.chat.completions.create(model="smollm2", messages=MESSAGES, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )

    choice = whole.choices[0]
    assert (choice.message.role, choice.message.content) == ("assistant", text)
    assert choice.finish_reason == expected.finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
        expected.prompt_tokens,
        8,
    )
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_completions_whole_streamed_and_stopped(client, server, smollm2):
    prompt = "The three primary colors are"
    expected = smollm2.generate(prompt, **GREEDY).read()

    whole = client.completions.create(model="smollm2", prompt=prompt, **GREEDY)
    streamed = client.completions.create(model="smollm2", prompt=[prompt], stream=True, **GREEDY)
    pieces = [chunk.choices[0].text for chunk in streamed]
    stop = expected.strip().split()[1]
    stopped = client.completions.create(model="smollm2", prompt=prompt, stop=[stop], **GREEDY)

    assert whole.choices[0].text == expected == "".join(pieces)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == expected[: expected.index(stop)]
    # the raw stream is Server-Sent Events ending with [DONE]
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"model": "smollm2", "prompt": prompt, "stream": True, **GREEDY}
    connection.request("POST", "/v1/completions", json.dumps(body).encode())
    response = connection.getresponse()
    events = response.read().decode().split("\n\n")
    connection.close()
    assert response.getheader("content-type").startswith("text/event-stream")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: {") for event in events[:-2])


def post_json(body: dict) -> bytes:
    return json.dumps(body).encode()


# (name, path, raw body, status, error type, param, phrase in the message)
BAD_REQUESTS = [
    (
        "malformed-json",
        "/v1/chat/completions",
        b'{"model": "smollm2", "messages": [',
        400,
        "invalid_request_error",
        None,
        "the request body is not valid JSON (Expecting value at line 1 column 35)",
    ),
    (
        "invalid-utf8",
        "/v1/embeddings",
        b'{"model": "minilm", "input": "caf\xe9"}',
        400,
        "invalid_request_error",
        None,
        "the request body is not valid UTF-8 (byte 0xe9 at offset 33)",
    ),
    (
        "lone-surrogate",
        "/v1/embeddings",
        b'{"model": "minilm", "input": "\\ud800"}',
        400,
        "invalid_request_error",
        None,
        "lone UTF-16 surrogate",
    ),
    (
        "not-an-object",
        "/v1/embeddings",
        b"[1, 2]",
        400,
        "invalid_request_error",
        None,
        "the request body is a JSON list, not an object",
    ),
    (
        "unknown-model",
        "/v1/chat/completions",
        post_json({"model": "gpt-4o", "messages": MESSAGES}),
        404,
        "not_found_error",
        "model",
        "The model 'gpt-4o' does not exist; this server has: minilm, smollm2 (GET /v1/models)",
    ),
    (
        "wrong-kind-of-model",
        "/v1/embeddings",
        post_json({"model": "smollm2", "input": "hello"}),
        400,
        "invalid_request_error",
        "model",
        "model 'smollm2' is a language model; /v1/embeddings serves: minilm",
    ),
    (
        "empty-messages",
        "/v1/chat/completions",
        post_json({"model": "smollm2", "messages": []}),
        400,
        "invalid_request_error",
        "messages",
        "messages is empty; send at least one message",
    ),
    (
        "max-tokens-1e9",
        "/v1/chat/completions",
        post_json({"model": "smollm2", "messages": MESSAGES, "max_tokens": 10**9}),
        400,
        "invalid_request_error",
        "max_tokens",
        "max_tokens is 1000000000, but model 'smollm2' has a context of 4096 tokens, prompt "
        "included; ask for at most 4096",
    ),
    (
        "max-tokens-1e9-streamed",
        "/v1/completions",
        post_json({"model": "smollm2", "prompt": "Hi", "max_tokens": 10**9, "stream": True}),
        400,
        "invalid_request_error",
        "max_tokens",
        "max_tokens is 1000000000",
    ),
    (
        "prompt-beyond-the-context",
        "/v1/completions",
        post_json({"model": "smollm2", "prompt": "hello " * 5000, "max_tokens": 4}),
        400,
        "invalid_request_error",
        "prompt",
        "tokens but the context holds 4096; shorten it",
    ),
    (
        "chat-with-an-embedding-model",
        "/v1/chat/completions",
        post_json({"model": "minilm", "messages": MESSAGES}),
        400,
        "invalid_request_error",
        "model",
        "model 'minilm' is an embedding model; /v1/chat/completions serves: smollm2",
    ),
    (
        "token-arrays",
        "/v1/embeddings",
        post_json({"model": "minilm", "input": [[101, 7592, 102]]}),
        400,
        "invalid_request_error",
        "input",
        "input as token arrays is not supported here; send the text",
    ),
    (
        "unknown-argument",
        "/v1/chat/completions",
        post_json({"model": "smollm2", "messages": MESSAGES, "tools": []}),
        400,
        "invalid_request_error",
        "tools",
        "Unrecognized request argument supplied: tools",
    ),
    (
        "wrong-type",
        "/v1/chat/completions",
        post_json({"model": "smollm2", "messages": MESSAGES, "temperature": "hot"}),
        400,
        "invalid_request_error",
        "temperature",
        "Invalid value for 'temperature': \"hot\"",
    ),
    (
        "n-choices",
        "/v1/chat/completions",
        post_json({"model": "smollm2", "messages": MESSAGES, "n": 3}),
        400,
        "invalid_request_error",
        "n",
        "Invalid value for 'n': 3: this server returns one choice; leave n out",
    ),
    (
        "stream-options-without-stream",
        "/v1/chat/completions",
        post_json(
            {"model": "smollm2", "messages": MESSAGES, "stream_options": {"include_usage": True}}
        ),
        400,
        "invalid_request_error",
        "stream_options",
        "stream_options is only allowed when stream is true",
    ),
    (
        "missing-model",
        "/v1/embeddings",
        post_json({"input": "hello"}),
        400,
        "invalid_request_error",
        "model",
        "Missing required parameter: 'model'",
    ),
    (
        "oversize-body",
        "/v1/embeddings",
        post_json({"model": "minilm", "input": "x" * (MAX_BODY + 1)}),
        413,
        "invalid_request_error",
        None,
        f"this server takes at most {MAX_BODY}",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "kind", "param", "phrase"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
def test_bad_input_is_a_4xx_openai_error_and_the_server_keeps_serving(
    server, client, path, body, status, kind, param, phrase
):
    answered, headers, error = server.post(path, body)

    assert answered == status
    assert headers["content-type"] == "application/json"
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
    assert phrase in error["error"]["message"]
    assert (error["error"]["type"], error["error"]["param"]) == (kind, param)
    good = client.embeddings.create(model="minilm", input="still serving")
    assert len(good.data[0].embedding) == 384


def test_the_client_sees_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model="smollm2", messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError) as huge:
        client.chat.completions.create(
            model="smollm2", messages=MESSAGES, max_tokens=10**9, stream=True
        )
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="hello")

    assert empty.value.status_code == 400 and empty.value.param == "messages"
    assert huge.value.status_code == 400 and huge.value.param == "max_tokens"
    reply = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=2, temperature=0
    )
    assert reply.usage.completion_tokens == 2


def test_a_busy_model_answers_503_at_once_and_a_dropped_stream_frees_it(smollm2):
    host = LanguageModelHost(smollm2, "smollm2", queue=0)
    app = Starlette(routes=openai_routes({}, {"smollm2": host}))
    with Server(app) as server:
        client = server.client()
        # A streamed chat holds the model while its client reads slowly.
        stream = client.chat.completions.create(
            model="smollm2", messages=MESSAGES, max_tokens=64, stream=True
        )
        next(iter(stream))
        started = time.perf_counter()
        with pytest.raises(openai.APIStatusError) as busy:
            client.completions.create(model="smollm2", prompt="Hi", max_tokens=2)
        refused_in = time.perf_counter() - started
        stream.close()  # the client goes away midway

        deadline = time.monotonic() + 30
        while host.admission.depth and time.monotonic() < deadline:
            time.sleep(0.05)
        after = client.completions.create(model="smollm2", prompt="Hi", max_tokens=2)

    assert busy.value.status_code == 503
    assert busy.value.response.headers["retry-after"] == "1"
    assert busy.value.body["type"] == "overloaded_error"
    assert "model 'smollm2' is busy" in busy.value.message
    assert refused_in < 0.5
    assert host.admission.depth == 0
    assert after.choices[0].finish_reason in ("length", "stop")
