"""Text models behind the OpenAI front end: a loaded ``Runtime`` wrapped as the
``EmbeddingModel`` and ``LanguageModel`` of ``edge_runtime.serve.protocol``.

Each host admits a bounded number of requests (``Admission``): one runs, a few wait, and
the rest are refused at once with ``Overloaded`` (503 and Retry-After), so nothing waits
forever and memory stays flat under a flood.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

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
