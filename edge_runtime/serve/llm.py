"""A served language model (GGUF): one request at a time, the others queued within a bound.

llama.cpp holds one context per model, so requests take turns. ``complete`` takes a queue
slot first (``Overloaded`` at once when ``queue_size`` are already waiting), then waits for
its turn. A streamed answer keeps the turn until the stream is finished or closed: a front
end must ``close()`` the iterator when its client goes away.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .models import BundleRef
from .protocol import BadRequest, NotReady, Overloaded

log = logging.getLogger(__name__)


class LanguageModelHost:
    """``protocol.LanguageModel`` over a GGUF bundle's llama-cpp-python engine."""

    def __init__(
        self,
        ref: BundleRef,
        pubkey: Path | None = None,
        *,
        threads: int | None = None,
        queue_size: int = 16,
        telemetry: Any = None,
    ) -> None:
        if ref.manifest.llm is None:
            raise ValueError(f"bundle {ref.path} holds no language model")
        self.name = ref.name
        self.ref = ref
        self.context_length = ref.manifest.llm.context_length
        self.queue_size = queue_size
        self._pubkey = pubkey
        self._threads = threads
        self._telemetry = telemetry
        self.runtime = None
        self.problem: str | None = "loading"
        self._waiting = 0
        self._count_lock = threading.Lock()
        self._turn = threading.Lock()
        self._closing = False
        self._run_seconds = 1.0

    def load(self) -> bool:
        """Open the bundle and check its greedy tokens; returns whether it is ready.

        Raises:
            EdgeRuntimeError: the bundle cannot be verified or loaded.
        """
        from ..agent import open_reported

        self.runtime = open_reported(self.ref.path, self._pubkey, self._threads, self._telemetry)
        report = self.runtime.selftest()
        if not report.passed:
            self.problem = (
                f"model {self.name!r} failed its self-test: {report.matched_tokens} of "
                f"{report.expected_tokens} greedy tokens match the build host's"
            )
            log.error("%s; it is not served", self.problem)
            return False
        self.problem = None
        return True

    @property
    def ready(self) -> bool:
        return self.problem is None and not self._closing

    @property
    def depth(self) -> int:
        return self._waiting

    def close(self, timeout_s: float = 10.0) -> None:
        """Refuse new requests, wait up to ``timeout_s`` for the running one, release."""
        self._closing = True
        if self._turn.acquire(timeout=timeout_s) and self.runtime is not None:
            self.runtime.close()

    def complete(self, request: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """``create_chat_completion`` (with ``messages``) or ``create_completion`` (with
        ``prompt``) of llama-cpp-python on this model; chunks when ``stream`` is set.

        Raises:
            NotReady: loading, failed its self-test, or shutting down.
            BadRequest: ``max_tokens`` beyond the context length.
            Overloaded: ``queue_size`` requests are already waiting.
        """
        if not self.ready:
            raise NotReady(f"model {self.name!r} is not ready: {self.problem or 'stopping'}")
        max_tokens = request.get("max_tokens")
        if max_tokens is not None and (
            not isinstance(max_tokens, int) or not 1 <= max_tokens <= self.context_length
        ):
            raise BadRequest(
                f"max_tokens {max_tokens!r} is not between 1 and the context length "
                f"{self.context_length} of model {self.name!r}; ask for fewer tokens"
            )
        request = {**request, "max_tokens": max_tokens or self.context_length}
        with self._count_lock:
            if self._waiting >= self.queue_size:
                raise Overloaded(
                    f"model {self.name!r} has {self._waiting} requests waiting, its limit; "
                    "retry shortly or raise --queue-size",
                    retry_after_s=max(1.0, self._waiting * self._run_seconds),
                )
            self._waiting += 1
        try:
            self._turn.acquire()
        finally:
            with self._count_lock:
                self._waiting -= 1
        if self._closing:
            self._turn.release()
            raise NotReady(f"model {self.name!r} is shutting down; retry elsewhere")
        if request.get("stream"):
            return self._streamed(request)
        try:
            return self._once(request)
        finally:
            self._turn.release()

    def _engine_call(self, request: dict[str, Any]):
        engine = self.runtime.backend.engine
        if "messages" in request:
            return engine.create_chat_completion(**request)
        return engine.create_completion(**request)

    def _once(self, request: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        error = None
        tokens = 0
        try:
            result = self._engine_call(request)
            tokens = (result.get("usage") or {}).get("completion_tokens", 0)
            return result
        except Exception as exc:
            error = exc
            raise
        finally:
            self._record(time.perf_counter() - started, tokens, error)

    def _streamed(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        try:
            chunks = iter(self._engine_call(request))
        except BaseException:
            self._turn.release()
            raise
        return _Stream(chunks, self)

    def _record(self, seconds: float, tokens: int, error: Exception | None) -> None:
        self._run_seconds = 0.8 * self._run_seconds + 0.2 * seconds
        telemetry = self.runtime.telemetry if self.runtime is not None else None
        if telemetry is not None:
            text = None if error is None else f"{error}"[:500]
            telemetry.record(seconds, error is None, tokens, text)


class _Stream:
    """The chunks of one streamed answer; holds the model's turn until exhausted or
    closed (also when it was never iterated, which a generator's ``finally`` misses)."""

    def __init__(self, chunks: Iterator[dict[str, Any]], host: LanguageModelHost) -> None:
        self._chunks = chunks
        self._host = host
        self._started = time.perf_counter()
        self._tokens = 0
        self._open = True

    def __iter__(self) -> _Stream:
        return self

    def __next__(self) -> dict[str, Any]:
        if not self._open:
            raise StopIteration
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self.close()
            raise
        except Exception as exc:
            self.close(exc)
            raise
        self._tokens += 1 if chunk.get("choices") else 0
        return chunk

    def close(self, error: Exception | None = None) -> None:
        if not self._open:
            return
        self._open = False
        try:
            closer = getattr(self._chunks, "close", None)
            if closer is not None:
                closer()
        finally:
            self._host._turn.release()
            self._host._record(time.perf_counter() - self._started, self._tokens, error)

    def __del__(self) -> None:
        self.close()
