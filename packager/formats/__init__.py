"""The model formats edgepack packages, one module each; ``formats()`` finds them.

A module in this package that defines ``PIPELINE`` (a ``base.FormatPipeline``) is a
format: adding one is adding a module here (and its backend in ``edge_runtime.backends``).
Format modules never import one another; what the tensor formats share lives in
``packager.formats.tensors``.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from pathlib import Path

from ..errors import ModelValidationError, PackagerError
from .base import FormatPipeline

# Loading these can run arbitrary code, so they are refused whatever they hold.
PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".bin"}


@cache
def formats() -> dict[str, FormatPipeline]:
    """Every format pipeline by name (``onnx``, ``tflite``, ``gguf``, ...)."""
    found = []
    for module in pkgutil.iter_modules(__path__):
        pipeline = getattr(importlib.import_module(f"{__name__}.{module.name}"), "PIPELINE", None)
        if isinstance(pipeline, FormatPipeline):
            found.append(pipeline)
    return {p.name: p for p in sorted(found, key=lambda p: (p.rank, p.name))}


def get_format(name: str) -> FormatPipeline:
    return formats()[name]


def format_for_engine(engine: str) -> FormatPipeline:
    """The format that the ``edge_runtime`` backend ``engine`` runs.

    Raises:
        PackagerError: no format runs on that backend.
    """
    by_engine = {pipeline.engine: pipeline for pipeline in formats().values()}
    if engine not in by_engine:
        raise PackagerError(
            f"unknown backend {engine!r}; choose from {', '.join(sorted(by_engine))}"
        )
    return by_engine[engine]


def detect_format(model: Path) -> FormatPipeline:
    """The pipeline for ``model``, from its suffix; refuses pickles and unknown suffixes.

    Raises:
        ModelValidationError: a pickle-based or unknown format, or no such file.
    """
    suffix = model.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ModelValidationError(
            f"{model.name}: pickle-based model formats are refused (loading them can run "
            "arbitrary code); export to ONNX first (torch.onnx.export) or convert to "
            "TFLite (litert_torch.convert)"
        )
    by_suffix = {s: pipeline for pipeline in formats().values() for s in pipeline.suffixes}
    if suffix not in by_suffix:
        raise ModelValidationError(
            f"{model.name}: unsupported model format {suffix!r}; give one of "
            f"{', '.join(sorted(by_suffix))}"
        )
    if not model.is_file():
        raise ModelValidationError(f"model file {model} does not exist")
    return by_suffix[suffix]
