"""ONNX Runtime backend."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError
from ..manifest import Manifest
from . import BackendOptions, TensorBackend, check_tensor_names, engine_threads

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


class OnnxSession:
    """One ONNX Runtime session with the options a bundle asks for.

    The device backend, the packager's evaluate step and its measuring worker all load
    models through this class, so the host runs a model the way the device will.
    """

    def __init__(
        self,
        model_path: Path,
        threads: int = 0,
        providers: list[str] | None = None,
        cpu_mem_arena: bool = True,
        allow_spinning: bool = True,
        display_path: str | None = None,
    ) -> None:
        """Load ``model_path``; the defaults are ONNX Runtime's own.

        Args:
            model_path: the .onnx file.
            threads: intra-op threads; 0 lets ONNX Runtime decide.
            providers: execution providers, most preferred first; missing ones are
                skipped with a warning and CPU is always last.
            cpu_mem_arena: keep ONNX Runtime's CPU memory arena.
            allow_spinning: let idle worker threads spin-wait for the next run.
            display_path: how errors name the model (default: its file name).

        Raises:
            BackendError: ONNX Runtime is not installed, or it refuses the model.
        """
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError(
                "this bundle needs ONNX Runtime: pip install 'edgepack[onnx]' "
                "(or 'edgepack[onnx-gpu]' on a CUDA device)"
            ) from None
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = cpu_mem_arena
        if not allow_spinning:
            # Idle workers sleep instead of spinning: an agent serving a few requests a
            # second would otherwise keep every core busy.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.intra_op_num_threads = threads
        wanted = providers or ["CPUExecutionProvider"]
        chosen = choose_providers(wanted, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=chosen
            )
        except Exception as exc:  # ORT raises its own untyped errors; keep the message
            shown = display_path or model_path.name
            raise BackendError(f"ONNX Runtime could not load {shown}: {exc}") from exc
        self.output_names = [output.name for output in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, values, strict=True))


class OnnxBackend(TensorBackend):
    name = "onnx"

    def __init__(self) -> None:
        self._session: OnnxSession | None = None
        self._spinning = False

    def load(self, model_dir: Path, manifest: Manifest, options: BackendOptions) -> None:
        spec = manifest.backend
        choice = engine_threads(
            "ONNX Runtime intra-op", spec.intra_op_threads, options, zero_counts_cores=True
        )
        # Spinning workers that outnumber the CPUs take turns burning each other's time
        # slices: a run then waits on threads that are spinning instead of working.
        self._spinning = spec.allow_spinning and not choice.oversubscribed
        self._session = OnnxSession(
            model_dir / manifest.model.path,
            threads=choice.threads,
            providers=options.providers or spec.providers or ["CPUExecutionProvider"],
            cpu_mem_arena=spec.enable_cpu_mem_arena,
            allow_spinning=self._spinning,
            display_path=manifest.model.path,
        )
        inputs = [node.name for node in self._session.session.get_inputs()]
        check_tensor_names(manifest, inputs, self._session.output_names)
        self.thread_choice = choice

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise BackendError("the ONNX backend is closed or was never loaded")
        return self._session.run(inputs)

    def close(self) -> None:
        self._session = None

    @property
    def engine(self):
        return self._session.session if self._session else None

    def metadata(self) -> dict[str, str]:
        """The model's ``metadata_props`` (ONNX Runtime's ``custom_metadata_map``)."""
        if self._session is None:
            return {}
        return dict(self._session.session.get_modelmeta().custom_metadata_map)

    def info(self) -> dict[str, Any]:
        if self._session is None:
            return {"providers": []}
        options = self._session.session.get_session_options()
        return {
            "providers": self._session.session.get_providers(),
            "threads": options.intra_op_num_threads,  # 0: ONNX Runtime's own choice
            "allow_spinning": self._spinning,
        }
