"""Inference backends behind two small interfaces; the manifest picks one by name.

A ``TensorBackend`` runs tensors in and tensors out (ONNX Runtime, LiteRT); a
``GenerativeBackend`` generates text (llama.cpp). ``Runtime`` decides once, from the
manifest, which of the two a bundle needs, and ``create_backend`` checks that the
registered class implements it.

Each backend module imports its engine inside ``load``, so a device only needs the engine
of the bundles it runs, and ``edge-runtime --help`` imports none of them.
"""

from __future__ import annotations

import importlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..cpus import ThreadChoice, choose_threads, log_choice, usable_cpus
from ..errors import BackendError, BundleError
from ..manifest import Manifest

if TYPE_CHECKING:  # annotations only: importing the registry loads no numpy
    import numpy as np

log = logging.getLogger(__name__)

# name -> "module:Class"; resolved lazily so importing this package stays cheap.
BACKENDS: dict[str, str] = {
    "onnx": "edge_runtime.backends.onnx:OnnxBackend",
    "llamacpp": "edge_runtime.backends.llamacpp:LlamaCppBackend",
    "tflite": "edge_runtime.backends.tflite:TfliteBackend",
}


@dataclass(frozen=True)
class BackendOptions:
    """Device-side overrides of what the manifest says; None keeps the manifest's choice."""

    providers: list[str] | None = None
    threads: int | None = None
    gpu_layers: int | None = None
    context_length: int | None = None


def engine_threads(
    engine: str, profile: int, options: BackendOptions, *, zero_counts_cores: bool
) -> ThreadChoice:
    """The threads a backend gives its engine: ``options.threads`` if given, else the
    profile's figure capped at the CPUs this process may use; logs the one line that says
    so when the figure is lowered (see ``edge_runtime.cpus``)."""
    choice = choose_threads(
        engine, profile, options.threads, usable_cpus(), zero_counts_cores=zero_counts_cores
    )
    log_choice(choice, log)
    return choice


# Called once when a stream ends: (the stream, seconds from its first read, the error
# that ended it or None). An abandoned stream (closed before its end) calls nothing.
StreamDone = Callable[["TokenStream", float, "Exception | None"], None]


class TokenStream:
    """Text pieces as they are generated; iterate it. Counts are final once it is exhausted.

    ``finish_reason`` is "stop" (a stop string or the model's end token), "length"
    (``max_tokens`` or the context is full) or None while running or if abandoned.
    """

    def __init__(
        self,
        produce: Callable[[TokenStream], Iterator[str]],
        prompt_tokens: int,
        on_finish: StreamDone | None = None,
    ) -> None:
        """
        Args:
            produce: called with this stream on the first read; yields the text pieces
                and keeps ``completion_tokens`` and ``finish_reason`` up to date.
            prompt_tokens: tokens in the prompt.
            on_finish: called once when the stream ends (see ``add_done_callback``).
        """
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text: list[str] = []
        self.seconds: float | None = None
        self._produce = produce
        self._pieces: Iterator[str] | None = None
        self._started = 0.0
        self._callbacks: list[StreamDone] = [on_finish] if on_finish else []

    def add_done_callback(self, callback: StreamDone) -> None:
        """Call ``callback(stream, seconds, error)`` once, when the stream ends.

        ``error`` is None when the stream ran to its end, else the exception that ended
        it (it is raised to the reader too). A stream already ended calls it at once.
        """
        if self.seconds is not None:
            callback(self, self.seconds, None)
        else:
            self._callbacks.append(callback)

    def __iter__(self) -> Iterator[str]:
        if self._pieces is None:
            self._started = time.perf_counter()
            self._pieces = self._produce(self)
        try:
            for piece in self._pieces:
                self.text.append(piece)
                yield piece
        except Exception as exc:
            self._finish(exc)
            raise
        self._finish(None)

    def _finish(self, error: Exception | None) -> None:
        if self.seconds is not None:
            return
        self.seconds = time.perf_counter() - self._started
        for callback in self._callbacks:
            callback(self, self.seconds, error)

    def read(self) -> str:
        """Consume the rest of the stream and return the whole generated text."""
        for _ in self:
            pass
        return "".join(self.text)


class Backend(ABC):
    """What every backend has: load, close, info, the engine; a context manager.

    Implement ``TensorBackend`` or ``GenerativeBackend``, not this class.
    """

    name: str
    # How many threads ``load`` gave the engine, and why; None before ``load``.
    thread_choice: ThreadChoice | None = None

    @abstractmethod
    def load(self, model_dir: Path, manifest: Manifest, options: BackendOptions) -> None:
        """Load the model files from ``model_dir`` (already verified and extracted)."""

    def close(self) -> None:  # noqa: B027 - optional hook, most engines free on GC
        """Release the engine's resources."""

    def info(self) -> dict[str, Any]:
        """Facts about the loaded engine (e.g. the providers actually in use)."""
        return {}

    def metadata(self) -> dict[str, str | bytes | int | float | bool]:
        """The model's own metadata, as its file carries it (ONNX metadata props, TFLite
        metadata entries, GGUF general.* and tokenizer.* values); {} when it has none."""
        return {}

    @property
    def engine(self) -> Any:
        """The engine object itself (e.g. the ``onnxruntime.InferenceSession``), for callers
        that need what the facade does not offer; None before ``load``."""
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class TensorBackend(Backend):
    """Runs a model on named tensors (ONNX Runtime, LiteRT)."""

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference on validated inputs; return outputs by name."""


class GenerativeBackend(Backend):
    """Generates text from a language model (llama.cpp)."""

    @abstractmethod
    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.95,
        top_k: int = 40,
        seed: int | None = None,
        stop: Sequence[str] = (),
        special: bool = False,
    ) -> TokenStream:
        """Stream a completion of ``prompt``; ``special`` parses special tokens in it."""

    @abstractmethod
    def chat(self, messages: list[dict[str, str]], **options: Any) -> TokenStream:
        """Format ``messages`` with the model's chat template, then ``generate``."""

    @abstractmethod
    def greedy_tokens(self, prompt: str, count: int) -> tuple[list[int], list[float]]:
        """The first ``count`` greedy tokens after ``prompt`` and each one's logit margin."""


def check_tensor_names(manifest: Manifest, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """Refuse a model whose tensors are not the ones the manifest lists.

    Called by a tensor backend once its engine has loaded the model, with the engine's
    own input and output names: ``Runtime.run`` checks inputs against the manifest, so
    the two must agree, or a run would fail inside the engine (a KeyError, or an input
    silently left at zeros).

    Raises:
        BundleError: an input the model lacks or the manifest lacks, or an output the
            model lacks.
    """
    listed = [spec.name for spec in manifest.inputs]
    problems = []
    if missing := [name for name in listed if name not in inputs]:
        problems.append(f"inputs {missing} are not the model's")
    if unlisted := [name for name in inputs if name not in listed]:
        problems.append(f"the model's inputs {unlisted} are not listed")
    if missing := [spec.name for spec in manifest.outputs if spec.name not in outputs]:
        problems.append(f"outputs {missing} are not the model's")
    if problems:
        raise BundleError(
            f"the manifest does not describe {manifest.model.path}: {'; '.join(problems)} "
            f"(the model has inputs {list(inputs)}, outputs {list(outputs)}); the bundle was "
            "built wrong, rebuild it with `edgepack build`"
        )


Interface = TypeVar("Interface", bound=Backend)


def interface_for(manifest: Manifest) -> type[TensorBackend] | type[GenerativeBackend]:
    """The interface a bundle's backend must implement: language models generate text
    (a GGUF model, with its ``llm`` section), every other format runs tensors."""
    return GenerativeBackend if manifest.llm is not None else TensorBackend


def create_backend(name: str, interface: type[Interface] = Backend) -> Interface:
    """Instantiate the backend registered as ``name``.

    Args:
        name: the manifest's ``backend.name``.
        interface: what the caller will use it as (``TensorBackend`` or
            ``GenerativeBackend``); the registered class must implement it.

    Raises:
        BackendError: the name is unknown, or its class is not an ``interface``.
    """
    target = BACKENDS.get(name)
    if target is None:
        raise BackendError(
            f"bundle needs backend {name!r}, which this runtime does not have; "
            f"available: {', '.join(sorted(BACKENDS))}"
        )
    module_name, class_name = target.split(":")
    backend_class = getattr(importlib.import_module(module_name), class_name)
    if not issubclass(backend_class, interface):
        raise BackendError(
            f"backend {name!r} ({target}) is not a {interface.__name__}, which this bundle "
            f"needs; register a class that implements {interface.__name__} in BACKENDS"
        )
    return backend_class()
