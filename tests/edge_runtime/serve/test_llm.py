"""``GgufModelHost`` on the SmolLM2 bundle: one request at a time, the others queued
within the bound, a stream holding the turn until it is finished or closed, and
``max_tokens`` capped by the context length."""

from __future__ import annotations

import threading
import time

import pytest

from edge_runtime.serve.llm import GgufModelHost
from edge_runtime.serve.models import resolve_bundles
from edge_runtime.serve.protocol import BadRequest, LanguageModel, NotReady, Overloaded

pytestmark = pytest.mark.slow

PROMPT = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0.0}


@pytest.fixture(scope="module")
def host(smollm2_x86_bundle, keypair):
    (ref,) = resolve_bundles([str(smollm2_x86_bundle)], keypair[1])
    served = GgufModelHost(ref, keypair[1], queue_size=1)
    assert served.load()
    yield served
    served.close()


def test_completions_and_chat_come_back_openai_shaped(host):
    assert isinstance(host, LanguageModel) and host.ready
    completion = host.complete(PROMPT)
    chat = host.complete(
        {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "seed": 1}
    )

    assert completion["object"] == "text_completion"
    assert 1 <= completion["usage"]["completion_tokens"] <= 6
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["choices"][0]["finish_reason"] in ("stop", "length")


def test_max_tokens_beyond_the_context_is_refused(host):
    with pytest.raises(BadRequest, match=f"has a context of {host.context_length} tokens"):
        host.complete({**PROMPT, "max_tokens": 10**9})


def test_a_stream_holds_the_turn_and_the_queue_bound_refuses_at_once(host):
    stream = host.complete({**PROMPT, "stream": True})
    first = next(stream)
    waiting: list = []
    second = threading.Thread(target=lambda: waiting.append(host.complete(PROMPT)))
    second.start()
    deadline = time.monotonic() + 10
    while host.depth < 2 and time.monotonic() < deadline:  # the stream and the second
        time.sleep(0.01)

    started = time.perf_counter()
    with pytest.raises(Overloaded, match="1 request.s. running and 1 waiting, the most it queues"):
        host.complete(PROMPT)
    refusal_s = time.perf_counter() - started
    assert waiting == []  # still waiting for the stream's turn
    rest = list(stream)
    second.join(timeout=60)

    assert refusal_s < 0.05
    assert first["choices"] and rest
    assert waiting and waiting[0]["choices"][0]["text"]


def test_a_stream_closed_unread_gives_the_turn_back(host):
    host.complete({**PROMPT, "stream": True}).close()

    assert host.complete(PROMPT)["choices"]


def test_a_closed_host_refuses(smollm2_x86_bundle, keypair):
    (ref,) = resolve_bundles([str(smollm2_x86_bundle)], keypair[1])
    closed = GgufModelHost(ref, keypair[1])

    with pytest.raises(NotReady, match="is not ready: loading"):
        closed.complete(PROMPT)
