"""ONNX Runtime backend."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError
from ..manifest import Manifest
from . import Backend, BackendOptions

log = logging.getLogger(__name__)


def choose_providers(wanted: list[str], available: list[str]) -> list[str]:
    """Keep the wanted providers this build of ONNX Runtime has, in order; warn on each gap.

    CPU is always appended last, so a GPU bundle still runs (slowly) on a device without one.
    """
    chosen = [provider for provider in wanted if provider in available]
    for index, provider in enumerate(wanted):
        if provider not in available:
            rest = [p for p in wanted[index + 1 :] if p in available] or ["CPUExecutionProvider"]
            log.warning(
                "execution provider %s is not available here; falling back to %s", provider, rest[0]
            )
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class OnnxBackend(Backend):
    name = "onnx"

    def __init__(self) -> None:
        self._session = None
        self._output_names: list[str] = []

    def load(self, model_dir: Path, manifest: Manifest, options: BackendOptions) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError(
                "this bundle needs ONNX Runtime: pip install 'edgepack[onnx]' "
                "(or 'edgepack[onnx-gpu]' on a CUDA device)"
            ) from None
        spec = manifest.backend
        session_options = ort.SessionOptions()
        session_options.enable_cpu_mem_arena = spec.enable_cpu_mem_arena
        if not spec.allow_spinning:
            # Idle workers sleep instead of spinning: an agent serving a few requests a
            # second would otherwise keep every core busy.
            session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        threads = options.threads if options.threads is not None else spec.intra_op_threads
        session_options.intra_op_num_threads = threads
        wanted = options.providers or spec.providers or ["CPUExecutionProvider"]
        providers = choose_providers(wanted, ort.get_available_providers())
        model_path = model_dir / manifest.model.path
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=session_options, providers=providers
            )
        except Exception as exc:  # ORT raises its own untyped errors; keep the message
            raise BackendError(f"ONNX Runtime could not load {manifest.model.path}: {exc}") from exc
        self._output_names = [output.name for output in self._session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise BackendError("the ONNX backend is closed or was never loaded")
        values = self._session.run(self._output_names, inputs)
        return dict(zip(self._output_names, values, strict=True))

    def close(self) -> None:
        self._session = None

    @property
    def engine(self):
        return self._session

    def info(self) -> dict[str, Any]:
        return {"providers": self._session.get_providers() if self._session else []}
