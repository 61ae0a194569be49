"""Inference backends behind one small interface; the manifest picks one by name.

Each backend module imports its engine inside ``load``, so a device only needs the engine
of the bundles it runs, and ``edge-runtime --help`` imports none of them.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError
from ..manifest import Manifest

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


@dataclass
class TokenStream:
    """Text pieces as they are generated; iterate it. Counts are final once it is exhausted.

    ``finish_reason`` is "stop" (a stop string or the model's end token), "length"
    (``max_tokens`` or the context is full) or None while running or if abandoned.
    """

    _pieces: Iterator[str]
    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None
    text: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[str]:
        for piece in self._pieces:
            self.text.append(piece)
            yield piece

    def read(self) -> str:
        """Consume the rest of the stream and return the whole generated text."""
        for _ in self:
            pass
        return "".join(self.text)


class Backend(ABC):
    """Runs one model. Use as a context manager, or call ``close``."""

    name: str

    @abstractmethod
    def load(self, model_dir: Path, manifest: Manifest, options: BackendOptions) -> None:
        """Load the model files from ``model_dir`` (already verified and extracted)."""

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference on validated inputs; return outputs by name."""

    def close(self) -> None:  # noqa: B027 - optional hook, most engines free on GC
        """Release the engine's resources."""

    def info(self) -> dict[str, Any]:
        """Facts about the loaded engine (e.g. the providers actually in use)."""
        return {}

    @property
    def engine(self) -> Any:
        """The engine object itself (e.g. the ``onnxruntime.InferenceSession``), for callers
        that need what the facade does not offer; None before ``load``."""
        return None

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def create_backend(name: str) -> Backend:
    """Instantiate the backend registered as ``name``.

    Raises:
        BackendError: the name is unknown.
    """
    target = BACKENDS.get(name)
    if target is None:
        raise BackendError(
            f"bundle needs backend {name!r}, which this runtime does not have; "
            f"available: {', '.join(sorted(BACKENDS))}"
        )
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)()
