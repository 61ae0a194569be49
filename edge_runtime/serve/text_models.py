"""Text models behind the OpenAI front end: a loaded ``Runtime`` wrapped as the
``EmbeddingModel`` and ``LanguageModel`` of ``edge_runtime.serve.protocol``.

Each host admits a bounded number of requests (``Admission``): one runs, a few wait, and
the rest are refused at once with ``Overloaded`` (503 and Retry-After), so nothing waits
forever and memory stays flat under a flood.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import BackendError, InputSignatureError
from .protocol import BadRequest, Overloaded

if TYPE_CHECKING:
    import numpy as np

    from ..runtime import Runtime

RETRY_AFTER_S = 1.0


class Ticket:
    """One admitted request's place; ``release`` (idempotent) gives it back."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._running = False
        self._done = False

    def run(self) -> None:
        """Wait for the model (at most ``wait_s``); Overloaded when it stays busy."""
        self._admission._wait_turn(self)
        self._running = True

    def release(self) -> None:
        if not self._done:
            self._done = True
            self._admission._leave(self._running)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class Admission:
    """At most ``concurrency`` requests run and ``queue`` more wait; a request beyond that
    is refused at once, and one that waits longer than ``wait_s`` is refused then."""

    def __init__(self, name: str, *, queue: int, concurrency: int = 1, wait_s: float = 60.0):
        if queue < 0 or concurrency < 1 or wait_s <= 0:
            raise ValueError("queue >= 0, concurrency >= 1 and wait_s > 0")
        self.name = name
        self.queue = queue
        self.concurrency = concurrency
        self.wait_s = wait_s
        self._turns = threading.Semaphore(concurrency)
        self._lock = threading.Lock()
        self._admitted = 0

    @property
    def depth(self) -> int:
        """Requests admitted and not finished: running plus waiting."""
        return self._admitted

    def enter(self) -> Ticket:
        """Admit a request (it waits for its turn with ``Ticket.run``).

        Raises:
            Overloaded: ``concurrency + queue`` requests are admitted already.
        """
        with self._lock:
            if self._admitted >= self.concurrency + self.queue:
                raise Overloaded(
                    f"model {self.name!r} is busy: {self.concurrency} request(s) running and "
                    f"{self.queue} waiting, the most it queues; retry shortly",
                    retry_after_s=RETRY_AFTER_S,
                )
            self._admitted += 1
        return Ticket(self)

    def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the admitted requests to finish (at shutdown);
        whether they did."""
        deadline = time.monotonic() + timeout_s
        while self._admitted and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._admitted

    def _wait_turn(self, ticket: Ticket) -> None:
        if not self._turns.acquire(timeout=self.wait_s):
            ticket.release()
            raise Overloaded(
                f"model {self.name!r} stayed busy for {self.wait_s:g} s; retry shortly",
                retry_after_s=RETRY_AFTER_S,
            )

    def _leave(self, running: bool) -> None:
        if running:
            self._turns.release()
        with self._lock:
            self._admitted -= 1


class EmbeddingModelHost:
    """``protocol.EmbeddingModel`` over a Runtime whose bundle carries a tokenizer and is
    built for the embedding task. One request runs at a time; ``queue`` more wait.

    Attributes:
        name: the model's name on the wire (default: the manifest's name).
        dimensions: the length of each embedding.
        admission: the bounded queue (its ``depth`` is running plus waiting requests).
    """

    def __init__(
        self, runtime: Runtime, name: str | None = None, *, queue: int = 16, wait_s: float = 60.0
    ) -> None:
        """
        Raises:
            BackendError: the bundle has no tokenizer or is not an embedding model, or the
                tokenizers library is missing (found now, not at the first request).
        """
        text = runtime.manifest.text
        if text is None or text.task != "embedding":
            what = "carries no tokenizer" if text is None else f"is a text {text.task} model"
            raise BackendError(
                f"bundle {runtime.manifest.name!r} {what}; /v1/embeddings serves bundles "
                "built with --tokenizer for --task embedding"
            )
        self.runtime = runtime
        self.name = name or runtime.manifest.name
        self.admission = Admission(self.name, queue=queue, wait_s=wait_s)
        self.dimensions = int(runtime.embed(["warm up"]).shape[1])

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Normalised float32 embeddings [len(texts), dimensions] and the tokens used.

        Raises:
            Overloaded: the queue is full, or the model stayed busy past ``wait_s``.
            BadRequest: not a list of strings, or a text the model cannot take.
        """
        with self.admission.enter() as ticket:
            try:
                batch = self.runtime.tokenize(texts)  # outside the turn: tokenizing is cheap
                ticket.run()
                return self.runtime.embed(batch), batch.tokens
            except InputSignatureError as exc:
                raise BadRequest(str(exc)) from None


def bad_request(message: str, param: str | None = None) -> BadRequest:
    """A BadRequest naming the request field at fault (OpenAI's error ``param``)."""
    error = BadRequest(message)
    error.param = param
    return error


class HeldStream:
    """The chunks of a streamed completion. The model stays held until they are all read
    or ``close`` is called (a client that goes away), whichever comes first."""

    def __init__(self, chunks: Iterator[dict[str, Any]], ticket: Ticket) -> None:
        self._chunks = chunks
        self._ticket = ticket

    def __iter__(self) -> HeldStream:
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop generating (after the token in progress) and free the model."""
        try:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
        finally:
            self._ticket.release()

    def __del__(self) -> None:  # a stream dropped unread must not hold the model forever
        self._ticket.release()


class LanguageModelHost:
    """``protocol.LanguageModel`` over a Runtime holding a GGUF bundle: llama.cpp's one
    context serves one request at a time; ``queue`` more wait, the rest get Overloaded.

    ``complete`` takes llama-cpp-python's ``create_completion`` (``prompt``) or
    ``create_chat_completion`` (``messages``) arguments, as far as they are supported:
    ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream`` and
    ``stream_options`` (``include_usage``). It returns the OpenAI-shaped result, or with
    ``stream`` a ``HeldStream`` of chunks. Chat uses the model's own chat template.

    Attributes:
        name: the model's name on the wire (default: the manifest's name).
        context_length: the context llama.cpp runs with (prompt and completion together).
        admission: the bounded queue (its ``depth`` is running plus waiting requests).
    """

    def __init__(
        self, runtime: Runtime, name: str | None = None, *, queue: int = 4, wait_s: float = 300.0
    ) -> None:
        """
        Raises:
            BackendError: the bundle is not a language model.
        """
        if runtime.manifest.llm is None:
            raise BackendError(
                f"bundle {runtime.manifest.name!r} is not a language model; /v1/chat/completions "
                "and /v1/completions serve GGUF bundles"
            )
        self.runtime = runtime
        self.name = name or runtime.manifest.name
        info = runtime.backend.info()
        self.context_length = int(info.get("context_length") or runtime.manifest.llm.context_length)
        self.admission = Admission(self.name, queue=queue, wait_s=wait_s)

    def complete(self, request: dict[str, Any]) -> dict[str, Any] | HeldStream:
        """One completion (``prompt``) or chat completion (``messages``); see the class.

        Blocks until the model is free (the stream: until it has started).

        Raises:
            BadRequest: ``max_tokens`` beyond the context, a prompt that fills it, empty
                ``messages``, a model without a chat template; ``param`` names the field.
            Overloaded: the queue is full, or the model stayed busy past ``wait_s``.
        """
        chat = "messages" in request
        options = self._options(request)
        ticket = self.admission.enter()
        try:
            ticket.run()
            stream = self._start(chat, request, options)
        except BaseException:
            ticket.release()
            raise
        shape = _Shape(chat, self.name)
        if request.get("stream"):
            usage = bool((request.get("stream_options") or {}).get("include_usage"))
            return HeldStream(shape.chunks(stream, usage), ticket)
        with ticket:
            text = stream.read()
        return shape.whole(stream, text)

    def _options(self, request: dict[str, Any]) -> dict[str, Any]:
        max_tokens = request.get("max_tokens")
        if max_tokens is not None and max_tokens > self.context_length:
            raise bad_request(
                f"max_tokens is {max_tokens}, but model {self.name!r} has a context of "
                f"{self.context_length} tokens, prompt included; ask for at most "
                f"{self.context_length}",
                "max_tokens",
            )
        stop = request.get("stop") or []
        return {
            "max_tokens": max_tokens or self.context_length,
            "temperature": request.get("temperature", 0.8),
            "top_p": request.get("top_p", 0.95),
            "seed": request.get("seed"),
            "stop": [stop] if isinstance(stop, str) else [s for s in stop if s],
        }

    def _start(self, chat: bool, request: dict[str, Any], options: dict[str, Any]):
        param = "messages" if chat else "prompt"
        try:
            if chat:
                if not request["messages"]:
                    raise bad_request("messages is empty; send at least one message", param)
                return self.runtime.chat(request["messages"], **options)
            return self.runtime.generate(request["prompt"], **options)
        except ValueError as exc:  # the prompt fills the context, a malformed message
            raise bad_request(str(exc), param) from None
        except BackendError as exc:  # no chat template in the model
            raise bad_request(f"{exc} (/v1/completions)", param) from None


class _Shape:
    """OpenAI's response objects for one completion, whole or as stream chunks."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    @staticmethod
    def _usage(stream) -> dict[str, int]:
        prompt, completion = stream.prompt_tokens, stream.completion_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _choice(self, text: str | None, finish: str | None, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def whole(self, stream, text: str) -> dict[str, Any]:
        finish = stream.finish_reason or "stop"
        if self.chat:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head(self.object), "choices": [choice], "usage": self._usage(stream)}

    def chunks(self, stream, usage: bool) -> Iterator[dict[str, Any]]:
        """Chunks as OpenAI streams them: (chat) the role first, then the text pieces, then
        the finish reason; with ``usage``, every chunk has ``usage: null`` and a last one
        with no choices carries the counts."""
        name = "chat.completion.chunk" if self.chat else "text_completion"
        extra = {"usage": None} if usage else {}

        def chunk(choices: list) -> dict[str, Any]:
            return {**self._head(name), "choices": choices, **extra}

        if self.chat:
            yield chunk([self._choice(None, None, first=True)])
        for piece in stream:
            yield chunk([self._choice(piece, None)])
        yield chunk([self._choice(None, stream.finish_reason or "stop")])
        if usage:
            yield {**self._head(name), "choices": [], "usage": self._usage(stream)}
