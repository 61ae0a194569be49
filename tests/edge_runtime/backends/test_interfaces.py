"""Tests for edge_runtime/backends/__init__.py: the two interfaces, the registry's check of
them, and ``TokenStream``'s completion callbacks.

``TokenStream`` is tested on plain generators of text pieces: it is the stream's own
bookkeeping under test, not an engine. Real generation with a telemetry hook is in
test_llamacpp.py.
"""

from __future__ import annotations

import importlib

import pytest

from edge_runtime.backends import (
    BACKENDS,
    GenerativeBackend,
    TensorBackend,
    TokenStream,
    create_backend,
    interface_for,
)
from edge_runtime.bundle import verify_bundle
from edge_runtime.errors import BackendError
from edge_runtime.runtime import Runtime


def backend_class(name: str) -> type:
    module, _, attribute = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


@pytest.mark.parametrize(
    ("name", "interface", "other"),
    [
        ("onnx", TensorBackend, GenerativeBackend),
        ("tflite", TensorBackend, GenerativeBackend),
        ("llamacpp", GenerativeBackend, TensorBackend),
    ],
)
def test_each_backend_implements_exactly_one_interface(name, interface, other):
    cls = backend_class(name)

    assert issubclass(cls, interface)
    assert not issubclass(cls, other)
    assert isinstance(create_backend(name, interface), cls)


def test_the_language_model_backend_has_no_run():
    assert not hasattr(backend_class("llamacpp"), "run")


@pytest.mark.parametrize(
    ("name", "interface", "message"),
    [
        ("llamacpp", TensorBackend, "backend 'llamacpp' (edge_runtime.backends.llamacpp:"),
        ("onnx", GenerativeBackend, "backend 'onnx' (edge_runtime.backends.onnx:OnnxBackend)"),
    ],
)
def test_registry_refuses_a_class_without_the_needed_interface(name, interface, message):
    with pytest.raises(BackendError) as caught:
        create_backend(name, interface)

    assert message in str(caught.value)
    assert f"is not a {interface.__name__}, which this bundle needs" in str(caught.value)
    assert f"register a class that implements {interface.__name__}" in str(caught.value)


def test_interface_comes_from_the_manifest(cnn_bundle, keypair):
    manifest = verify_bundle(cnn_bundle, keypair[1]).manifest

    assert interface_for(manifest) is TensorBackend
    assert interface_for(manifest.model_copy(update={"llm": object()})) is GenerativeBackend


def test_runtime_refuses_a_backend_of_the_other_interface(cnn_bundle, keypair, tmp_path):
    verified = verify_bundle(cnn_bundle, keypair[1])

    with pytest.raises(BackendError, match="needs a TensorBackend, not LlamaCppBackend"):
        Runtime(verified, tmp_path, create_backend("llamacpp"), owns_dir=False)


# --- TokenStream ------------------------------------------------------------------------


class Done:
    """Records every completion callback."""

    def __init__(self) -> None:
        self.calls: list[tuple[TokenStream, float, Exception | None]] = []

    def __call__(self, stream: TokenStream, seconds: float, error: Exception | None) -> None:
        self.calls.append((stream, seconds, error))


def counting(pieces: list[str], fail_after: int | None = None, reason: str = "stop"):
    """A producer that counts one token per piece, as a backend does."""

    def produce(stream: TokenStream):
        for index, piece in enumerate(pieces):
            if index == fail_after:
                raise RuntimeError("the engine failed")
            stream.completion_tokens += 1
            yield piece
        stream.finish_reason = reason

    return produce


def test_callback_runs_once_when_the_stream_ends():
    done = Done()
    stream = TokenStream(counting(["a", "b", "c"]), prompt_tokens=5, on_finish=done)

    first = next(iter(stream))
    assert (first, done.calls) == ("a", [])
    text = stream.read()
    stream.read()

    assert text == "abc"
    [(seen, seconds, error)] = done.calls
    assert seen is stream and error is None
    assert seconds == stream.seconds and seconds >= 0
    assert (stream.completion_tokens, stream.finish_reason) == (3, "stop")


def test_callback_gets_the_error_that_ended_the_stream():
    done = Done()
    stream = TokenStream(counting(["a", "b", "c"], fail_after=2), prompt_tokens=1)
    stream.add_done_callback(done)

    with pytest.raises(RuntimeError, match="the engine failed"):
        stream.read()

    [(_, _, error)] = done.calls
    assert isinstance(error, RuntimeError)
    assert stream.completion_tokens == 2


def test_an_abandoned_stream_reports_nothing():
    done = Done()
    stream = TokenStream(counting(["a", "b", "c"]), prompt_tokens=1, on_finish=done)

    for _ in stream:
        break

    assert done.calls == []
    assert stream.seconds is None


def test_a_callback_added_after_the_end_runs_at_once():
    stream = TokenStream(counting(["a"]), prompt_tokens=1)
    stream.read()
    done = Done()

    stream.add_done_callback(done)

    assert [(seen, error) for seen, _, error in done.calls] == [(stream, None)]


def test_nothing_is_produced_before_the_first_read():
    started: list[TokenStream] = []

    def produce(stream: TokenStream):
        started.append(stream)
        yield "x"

    stream = TokenStream(produce, prompt_tokens=1)

    assert started == []
    assert stream.read() == "x"
    assert started == [stream]
