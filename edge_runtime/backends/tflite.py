"""TFLite / LiteRT backend: ``ai_edge_litert`` when installed, else ``tflite_runtime``.

``ai_edge_litert`` is Google's maintained LiteRT wheel. ``tflite_runtime`` is what many
Raspberry Pi images still carry; its last release (2.14) was built against numpy 1.x and
does not verify flatbuffers, so every model is walked by ``edge_runtime.tflite_file``
first. XNNPACK is on unless the manifest turns it off: both interpreters apply it by
default to the float and int8 operators it supports.

``run`` sets the input tensors, invokes and reads the outputs through the interpreter's
own calls, the same ones a bare ``interpreter.invoke()`` loop uses; the signature runner
would resize and re-allocate every tensor on every call.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError, ModelFileError
from ..manifest import Manifest, TensorSpec
from ..tflite_file import check_tflite
from . import BackendOptions, TensorBackend, check_tensor_names, engine_threads

log = logging.getLogger(__name__)

# Preference order; $EDGEPACK_TFLITE_INTERPRETER picks one of them explicitly.
INTERPRETERS = ("ai_edge_litert", "tflite_runtime")
INTERPRETER_ENV = "EDGEPACK_TFLITE_INTERPRETER"
_DISTRIBUTIONS = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}


def import_interpreter(wanted: str | None = None) -> tuple[str, Any]:
    """The first importable interpreter package as (name, its ``interpreter`` module).

    Args:
        wanted: one of ``INTERPRETERS``; None tries them in order (or the environment
            variable's choice).

    Raises:
        BackendError: the wanted package, or every package, cannot be imported; the
            message says what to install.
    """
    wanted = wanted or os.environ.get(INTERPRETER_ENV) or None
    if wanted is not None and wanted not in INTERPRETERS:
        raise BackendError(
            f"{INTERPRETER_ENV}={wanted!r} is not a TFLite interpreter package; "
            f"use one of {', '.join(INTERPRETERS)}"
        )
    problems = []
    for name in [wanted] if wanted else INTERPRETERS:
        try:
            module = importlib.import_module(f"{name}.interpreter")
            if name == "tflite_runtime" and int(np.__version__.split(".")[0]) >= 2:
                # Its last release (2.14) was compiled against numpy 1.x: it imports, then
                # fails with SystemError when it creates an interpreter.
                problems.append(
                    f"tflite_runtime: its extension was built for numpy 1.x and numpy "
                    f"{np.__version__} is installed (pip install 'numpy<2')"
                )
                continue
            return name, module
        except ModuleNotFoundError as exc:
            if exc.name is None or not name.startswith(exc.name.split(".")[0]):
                problems.append(f"{name}: {exc}")  # installed, but a dependency is missing
            else:
                problems.append(f"{name}: not installed")
        except (ImportError, AttributeError) as exc:
            # tflite_runtime 2.14's extension was compiled against numpy 1.x.
            hint = " (it needs numpy<2)" if "numpy" in str(exc).lower() else ""
            problems.append(f"{name}: cannot be imported{hint}: {str(exc).splitlines()[0]}")
    raise BackendError(
        "this bundle needs a TFLite interpreter: pip install 'edgepack[tflite]' "
        "(ai-edge-litert), or tflite-runtime with numpy<2; " + "; ".join(problems)
    )


def interpreter_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(_DISTRIBUTIONS[name])
    except metadata.PackageNotFoundError:  # e.g. in a frozen executable, without metadata
        return str(getattr(importlib.import_module(name), "__version__", "unknown"))


class TfliteSession:
    """One loaded interpreter, bound to the tensors of one signature.

    The device backend and the packager's evaluate and measure steps all run models
    through this class, so the host checks the model the way the device will run it.
    """

    def __init__(
        self,
        model_path: Path,
        threads: int = 0,
        xnnpack: bool = True,
        signature: str | None = None,
        package: str | None = None,
    ) -> None:
        """Load ``model_path`` after checking its structure.

        Raises:
            ModelFileError: the file is not a well-formed TFLite flatbuffer.
            BackendError: no interpreter package, or it refuses the model.
        """
        self.facts = check_tflite(model_path)
        self.package, module = import_interpreter(package)
        self.threads, self.xnnpack = threads, xnnpack
        resolver = module.OpResolverType
        try:
            self.interpreter = module.Interpreter(
                model_path=str(model_path),
                # 0 means "the engine decides": no num_threads (ai_edge_litert refuses -1).
                num_threads=threads if threads > 0 else None,
                experimental_op_resolver_type=resolver.AUTO
                if xnnpack
                else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            )
            self._bind(signature)
        except (ValueError, RuntimeError, SystemError) as exc:
            raise BackendError(f"{self.package} could not load {model_path.name}: {exc}") from exc
        # One interpreter runs one inference at a time; callers may share the Runtime.
        self._lock = threading.Lock()

    def _bind(self, signature: str | None) -> None:
        """Map tensor names to tensor indices, through the signature when the model has one."""
        interpreter = self.interpreter
        signatures = interpreter.get_signature_list()
        self.runner = None
        self.signature = None
        if signatures:
            self.signature = signature if signature in signatures else next(iter(signatures))
            runner = interpreter.get_signature_runner(self.signature)
            inputs, outputs = runner.get_input_details(), runner.get_output_details()
            # A signature on another subgraph than the first needs the runner to invoke it.
            # Otherwise drop it: the interpreter refuses to run while it holds a reference.
            if getattr(runner, "_subgraph_index", 0) != 0:
                self.runner = runner
            del runner
        else:
            inputs = {d["name"]: d for d in interpreter.get_input_details()}
            outputs = {d["name"]: d for d in interpreter.get_output_details()}
        if self.runner is None:
            interpreter.allocate_tensors()
        self.input_details, self.output_details = inputs, outputs
        self.input_indices = {name: d["index"] for name, d in inputs.items()}
        self.output_indices = {name: d["index"] for name, d in outputs.items()}
        self._shapes = {name: tuple(int(n) for n in d["shape"]) for name, d in inputs.items()}
        # Only a model with a free dimension ever needs a resize.
        self._resizable = any(
            isinstance(dim, str) for spec in self.input_specs() for dim in spec.shape
        )

    def input_specs(self) -> list[TensorSpec]:
        return _specs(self.input_details)

    def output_specs(self) -> list[TensorSpec]:
        return _specs(self.output_details)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        interpreter = self.interpreter
        with self._lock:
            if self.runner is not None:
                return self.runner(**inputs)
            if self._resizable:
                self._resize(inputs)
            for name, value in inputs.items():
                interpreter.set_tensor(self.input_indices[name], value)
            interpreter.invoke()
            # get_tensor copies, so the caller's arrays outlive the next invoke.
            return {
                name: interpreter.get_tensor(index) for name, index in self.output_indices.items()
            }

    def _resize(self, inputs: dict[str, np.ndarray]) -> None:
        """Resize inputs whose free dimension changed size (once, not on every call)."""
        resized = False
        for name, value in inputs.items():
            if value.shape != self._shapes[name]:
                self.interpreter.resize_tensor_input(self.input_indices[name], value.shape)
                self._shapes[name] = value.shape
                resized = True
        if resized:
            self.interpreter.allocate_tensors()

    def info(self) -> dict[str, Any]:
        return {
            "interpreter": f"{self.package} {interpreter_version(self.package)}",
            "threads": self.threads,
            "xnnpack": self.xnnpack,
            "signature": self.signature,
        }


def _specs(details: dict[str, dict]) -> list[TensorSpec]:
    """TensorSpecs from interpreter details; a -1 in the shape signature is a free dimension."""
    specs = []
    for name, detail in details.items():
        signature = detail.get("shape_signature")
        dims = signature if signature is not None and len(signature) else detail["shape"]
        shape: list[int | str] = [
            int(size) if size >= 0 else f"{name}_dim{axis}" for axis, size in enumerate(dims)
        ]
        specs.append(TensorSpec(name=name, dtype=np.dtype(detail["dtype"]).name, shape=shape))
    return specs


class TfliteBackend(TensorBackend):
    name = "tflite"

    def __init__(self) -> None:
        self._session: TfliteSession | None = None

    def load(self, model_dir: Path, manifest: Manifest, options: BackendOptions) -> None:
        spec = manifest.backend
        if spec.name != "tflite":
            raise BackendError(f"the TFLite backend cannot run a {spec.name} bundle")
        # LiteRT's own choice (0) stays single-threaded on any host: nothing to cap.
        choice = engine_threads("LiteRT", spec.intra_op_threads, options, zero_counts_cores=False)
        try:
            self._session = TfliteSession(
                model_dir / manifest.model.path,
                choice.threads,
                spec.xnnpack,
                manifest.model.signature,
            )
        except ModelFileError as exc:
            raise BackendError(f"refusing to load {manifest.model.path}: {exc}") from None
        session = self._session
        check_tensor_names(manifest, list(session.input_indices), list(session.output_indices))
        self.thread_choice = choice

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise BackendError("the TFLite backend is closed or was never loaded")
        return self._session.run(inputs)

    def close(self) -> None:
        self._session = None

    @property
    def engine(self):
        """The interpreter object (``ai_edge_litert`` or ``tflite_runtime``)."""
        return self._session.interpreter if self._session else None

    @property
    def session(self) -> TfliteSession | None:
        """The loaded session: the interpreter and its tensor indices by name."""
        return self._session

    def metadata(self) -> dict[str, str | bytes]:
        """The model's metadata entries: UTF-8 text (trailing NULs dropped) where the bytes
        are text, else the bytes (e.g. the TFLite Support library's flatbuffer)."""
        if self._session is None:
            return {}
        return {name: _text_or_bytes(raw) for name, raw in self._session.facts.metadata.items()}

    def info(self) -> dict[str, Any]:
        return self._session.info() if self._session else {}


def _text_or_bytes(raw: bytes) -> str | bytes:
    """``raw`` as text when it is UTF-8 without control characters (tabs and newlines
    allowed) once the NUL padding at its end is dropped; otherwise ``raw`` itself."""
    try:
        text = raw.rstrip(b"\0").decode("utf-8")
    except UnicodeDecodeError:
        return raw
    if any(ord(char) < 32 and char not in "\t\n\r" for char in text):
        return raw
    return text
