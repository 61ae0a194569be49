"""Served tensor models: a verified bundle behind a bounded queue and one worker thread.

``TensorModelHost`` implements ``protocol.TensorModel``. Requests are checked against the
manifest when they arrive (a ``BadRequest`` at once, never a queue slot), then wait in a
queue of at most ``queue_size``; a full queue is ``Overloaded`` at once, with a
``retry_after_s`` from the recent run time. One worker thread per model runs them. For a
model whose first axis is free, the worker stacks concurrent requests of the same shape
into one run of up to ``max_batch_size`` rows, waiting at most ``max_queue_delay_ms`` for
them, and splits the outputs back: a CPU runs a batch of 8 in much less than 8 runs.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import EdgeRuntimeError, InputSignatureError, ServiceError
from ..feeding import Feeder
from ..manifest import Manifest, ServingSpec
from .protocol import (
    BadRequest,
    ModelMetadata,
    NotReady,
    Overloaded,
    ServeError,
)
from .tensors import tensor_metadata

log = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PLATFORMS = {"onnx": "onnxruntime_onnx", "tflite": "tflite", "gguf": "llama.cpp"}
# Recipes that quantize activations with ranges measured on each run's whole batch: a
# request's result would depend on the requests batched with it, so they are not batched.
PER_RUN_RANGES = re.compile(r"dynamic")


@dataclass(frozen=True)
class BundleRef:
    """A verified bundle and the name it is served under."""

    name: str
    path: Path
    manifest: Manifest


def resolve_bundles(args: Sequence[str], pubkey: Path | None) -> list[BundleRef]:
    """Verify each ``BUNDLE`` or ``NAME=BUNDLE``; name each by its manifest otherwise.

    Raises:
        BundleError, SignatureError, TrustError: a bundle does not verify.
        ServiceError: a missing file, a name that is not URL-safe, or a name used twice.
    """
    from ..bundle import verify_bundle

    refs: list[BundleRef] = []
    for arg in args:
        given, named, rest = arg.partition("=")
        name, path = None, Path(arg)
        if named and not path.exists() and rest:  # NAME=BUNDLE, not a file with '=' in it
            name, path = given, Path(rest)
        if not path.is_file():
            raise ServiceError(f"bundle {path} does not exist")
        manifest = verify_bundle(path, pubkey).manifest
        name = name or manifest.name
        if not MODEL_NAME.match(name):
            raise ServiceError(
                f"bundle {path} is named {name!r}, which cannot be a URL path segment; serve "
                "it as NAME=BUNDLE with letters, digits, '.', '_' or '-'"
            )
        taken = next((ref for ref in refs if ref.name == name), None)
        if taken is not None:
            raise ServiceError(
                f"bundles {taken.path} and {path} are both named {name!r}; name one of them "
                f"as OTHER={path}"
            )
        refs.append(BundleRef(name, path, manifest))
    return refs


class HostObserver(Protocol):
    """What a host reports as it works (``metrics.ServeMetrics`` is one)."""

    def queue_depth(self, model: str, depth: int) -> None: ...

    def batch(self, model: str, rows: int, requests: int, seconds: float) -> None: ...


@dataclass(frozen=True)
class Batching:
    """How a host batches: ``max_batch_size`` 1 is off; ``reason`` says why when off."""

    max_batch_size: int
    max_queue_delay_s: float
    reason: str = ""


def batching_for(
    manifest: Manifest, max_batch_size: int | None, max_queue_delay_ms: float | None
) -> Batching:
    """The bundle's serving section (or none: off), overridden by flags, then turned off
    for a model whose requests cannot be stacked on axis 0."""
    spec = manifest.serving or ServingSpec()
    size = max_batch_size if max_batch_size is not None else spec.max_batch_size
    delay = max_queue_delay_ms if max_queue_delay_ms is not None else spec.max_queue_delay_ms
    reason = _unbatchable(manifest) if size > 1 else "max_batch_size is 1"
    return Batching(1 if reason else size, delay / 1000.0, reason)


def _unbatchable(manifest: Manifest) -> str:
    if not Feeder(manifest.inputs, manifest.outputs, manifest.feeding).plain:
        return "the model has constant inputs, other batch axes or carried state"
    first = {spec.shape[0] if spec.shape else None for spec in manifest.inputs}
    if len(first) != 1 or not isinstance(next(iter(first)), str):
        return "the inputs' first axes are not one free dimension"
    if not all(spec.shape and isinstance(spec.shape[0], str) for spec in manifest.outputs):
        return "an output's first axis is not free"
    if PER_RUN_RANGES.search(manifest.model.recipe):
        return f"recipe {manifest.model.recipe} quantizes activations per run"
    return ""


class _Request:
    __slots__ = ("inputs", "outputs", "future", "key", "rows", "arrived")

    def __init__(self, inputs, outputs, key, rows) -> None:
        self.inputs: dict[str, np.ndarray] | Callable[[Any], Any] = inputs
        self.outputs: list[str] | None = outputs
        self.future: Future = Future()
        self.key = key
        self.rows: int = rows
        self.arrived = time.monotonic()


class TensorModelHost:
    """One tensor bundle served: ``load()``, then ``submit``/``infer`` from any thread."""

    def __init__(
        self,
        ref: BundleRef,
        pubkey: Path | None = None,
        *,
        threads: int | None = None,
        queue_size: int = 16,
        max_batch_size: int | None = None,
        max_queue_delay_ms: float | None = None,
        telemetry: Any = None,
        observer: HostObserver | None = None,
    ) -> None:
        self.name = ref.name
        self.ref = ref
        self._pubkey = pubkey
        self._threads = threads
        self._telemetry = telemetry
        self.queue_size = queue_size
        self.batching = batching_for(ref.manifest, max_batch_size, max_queue_delay_ms)
        self.observer = observer
        manifest = ref.manifest
        self._specs = manifest.inputs
        self._outputs = [spec.name for spec in manifest.outputs]
        self._constants = Feeder(manifest.inputs, manifest.outputs, manifest.feeding).constants
        self._metadata = ModelMetadata(
            name=ref.name,
            platform=PLATFORMS[manifest.model.format],
            versions=["1"],
            inputs=[tensor_metadata(spec) for spec in manifest.inputs],
            outputs=[tensor_metadata(spec) for spec in manifest.outputs],
        )
        self.runtime = None
        self.problem: str | None = "loading"  # why the model is not ready; None once it is
        self._pending: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._worker: threading.Thread | None = None
        self._run_seconds = 0.01  # recent seconds per run, for Retry-After

    # -- lifecycle ------------------------------------------------------------------
    def load(self) -> bool:
        """Open the bundle (verified again, as ``Runtime.open`` does), run its self-test,
        start the worker. Returns whether the model is ready.

        Raises:
            EdgeRuntimeError: the bundle cannot be verified or loaded.
        """
        from ..agent import open_reported

        runtime = open_reported(self.ref.path, self._pubkey, self._threads, self._telemetry)
        self.runtime = runtime
        report = runtime.selftest()
        if not report.passed:
            self.problem = (
                f"model {self.name!r} failed its self-test: "
                f"{'; '.join(report.failures[:3]) or 'outputs differ from the reference'}"
            )
            log.error("%s; it is not served", self.problem)
            return False
        self._worker = threading.Thread(target=self._work, name=f"serve-{self.name}", daemon=True)
        self._worker.start()
        self.problem = None
        if self.batching.max_batch_size > 1:
            log.info(
                "serving %s: batches of up to %d rows, waiting at most %g ms",
                self.name,
                self.batching.max_batch_size,
                self.batching.max_queue_delay_s * 1000,
            )
        else:
            log.info("serving %s: no batching (%s)", self.name, self.batching.reason)
        return True

    @property
    def ready(self) -> bool:
        """Loaded, self-tested, and its worker alive."""
        worker = self._worker
        return self.problem is None and worker is not None and worker.is_alive()

    def close(self, timeout_s: float = 10.0) -> None:
        """Refuse new requests, let the queued ones finish within ``timeout_s``, then
        release the engine."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout_s)
        self._fail_pending(NotReady(f"model {self.name!r} is shutting down; retry elsewhere"))
        if self.runtime is not None and (self._worker is None or not self._worker.is_alive()):
            self.runtime.close()

    # -- requests -------------------------------------------------------------------
    def metadata(self) -> ModelMetadata:
        return self._metadata

    def infer(self, inputs: dict[str, Any], outputs: list[str] | None = None) -> dict[str, Any]:
        """``protocol.TensorModel.infer``: blocks until the result is in."""
        return self.submit(inputs, outputs).result()

    def submit(self, inputs: dict[str, Any], outputs: list[str] | None = None) -> Future:
        """Check and queue one request; the future holds the outputs by name.

        Raises:
            NotReady: the model is loading, failed its self-test, or is shutting down.
            BadRequest: the inputs or requested outputs do not match the manifest.
            Overloaded: the queue is full (``retry_after_s`` says when to retry).
        """
        self._check_ready()
        inputs = self._checked(inputs)
        if outputs is not None:
            unknown = [name for name in outputs if name not in self._outputs]
            if unknown:
                raise BadRequest(
                    f"model {self.name!r} has no output {unknown[0]!r}; its outputs are "
                    f"{', '.join(self._outputs)}"
                )
        key, rows = None, 0
        if self.batching.max_batch_size > 1:
            key = tuple((name, value.shape[1:]) for name, value in sorted(inputs.items()))
            rows = next(iter(inputs.values())).shape[0]
        return self._enqueue(_Request(inputs, outputs, key, rows))

    def call(self, fn: Callable[[Any], Any]) -> Future:
        """Run ``fn(runtime)`` on the worker, in turn with the requests and within the same
        queue bound (e.g. ``runtime.embed(texts)``); never batched."""
        self._check_ready()
        return self._enqueue(_Request(fn, None, None, 0))

    @property
    def depth(self) -> int:
        """Requests waiting (not counting those running)."""
        return len(self._pending)

    def _check_ready(self) -> None:
        if self._closing:
            raise NotReady(f"model {self.name!r} is shutting down; retry elsewhere")
        if not self.ready:
            problem = self.problem or "its worker stopped"
            raise NotReady(f"model {self.name!r} is not ready: {problem}", retry_after_s=1.0)

    def _checked(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        from ..runtime import check_inputs

        if self._constants:
            inputs = {**self._constants, **inputs}
        try:
            check_inputs(self._specs, inputs)
        except InputSignatureError as exc:
            raise BadRequest(f"model {self.name!r}: {exc}") from None
        return inputs

    def _enqueue(self, request: _Request) -> Future:
        with self._cond:
            depth = len(self._pending)
            if depth >= self.queue_size:
                wait = (depth + 1) * self._run_seconds / max(1, self.batching.max_batch_size)
                raise Overloaded(
                    f"model {self.name!r} has {depth} requests waiting, its limit; retry "
                    "shortly or raise --queue-size",
                    retry_after_s=max(0.05, wait),
                )
            self._pending.append(request)
            self._cond.notify()
        if self.observer is not None:
            self.observer.queue_depth(self.name, depth + 1)
        return request.future

    # -- the worker -----------------------------------------------------------------
    def _work(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                if self.observer is not None:
                    self.observer.queue_depth(self.name, len(self._pending))
                self._run(batch)
        except BaseException as exc:  # a bug: say so, and answer every waiting request
            log.exception("the worker of model %s stopped", self.name)
            self.problem = f"its worker stopped ({type(exc).__name__}: {exc})"
            self._fail_pending(ServeError(f"model {self.name!r} stopped: {exc}"))
            raise

    def _next_batch(self) -> list[_Request] | None:
        limit = self.batching.max_batch_size
        with self._cond:
            while not self._pending:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._pending.popleft()
            batch, rows = [first], first.rows
            if first.key is None or limit <= 1 or rows >= limit:
                return batch
            deadline = first.arrived + self.batching.max_queue_delay_s
            while True:
                for request in list(self._pending):
                    if request.key == first.key and rows + request.rows <= limit:
                        self._pending.remove(request)
                        batch.append(request)
                        rows += request.rows
                remaining = deadline - time.monotonic()
                if rows >= limit or remaining <= 0 or self._closing:
                    return batch
                self._cond.wait(remaining)

    def _run(self, batch: list[_Request]) -> None:
        started = time.perf_counter()
        runtime = self.runtime
        try:
            if callable(batch[0].inputs):
                batch[0].future.set_result(batch[0].inputs(runtime))
                return
            if len(batch) == 1:
                results = [runtime.run(batch[0].inputs)]
            else:
                results = self._run_stacked(batch)
            for request, outputs in zip(batch, results, strict=True):
                if request.outputs is not None:
                    outputs = {name: outputs[name] for name in request.outputs}
                request.future.set_result(outputs)
        except Exception as exc:
            error = _served_error(exc, self.name)
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
        finally:
            seconds = time.perf_counter() - started
            self._run_seconds = 0.8 * self._run_seconds + 0.2 * seconds
            if self.observer is not None:
                self.observer.batch(self.name, sum(r.rows for r in batch), len(batch), seconds)

    def _run_stacked(self, batch: list[_Request]) -> list[dict[str, np.ndarray]]:
        names = list(batch[0].inputs)
        stacked = {name: np.concatenate([r.inputs[name] for r in batch]) for name in names}
        outputs = self.runtime.run(stacked)
        total = sum(r.rows for r in batch)
        if any(value.shape[:1] != (total,) for value in outputs.values()):
            # An output whose first axis is not the batch after all: run one by one.
            return [self.runtime.run(request.inputs) for request in batch]
        results, start = [], 0
        for request in batch:
            end = start + request.rows
            results.append({name: value[start:end] for name, value in outputs.items()})
            start = end
        return results

    def _fail_pending(self, error: ServeError) -> None:
        with self._cond:
            pending, self._pending = list(self._pending), collections.deque()
        for request in pending:
            if not request.future.done():
                request.future.set_exception(error)


def _served_error(exc: Exception, model: str) -> ServeError:
    """An engine's refusal as the error a client gets."""
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, InputSignatureError):
        return BadRequest(f"model {model!r}: {exc}")
    if isinstance(exc, EdgeRuntimeError):
        return ServeError(f"model {model!r} failed: {exc}")
    log.error("model %s failed on a request: %s", model, exc, exc_info=exc)
    return ServeError(f"model {model!r} failed: {type(exc).__name__}: {exc}"[:500])
