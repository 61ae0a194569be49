"""Evaluate: compare a candidate with the fp32 reference on the held-out eval data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from edge_runtime.selftest import cosine_rows

from ..data import sample, sample_count
from ..formats import detect_format, formats
from .base import ModelArtifact, Pass, PassConfig, PassContext, PassOutput


def run_samples(model_path: Path, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run every sample one at a time on the host CPU; stack the outputs.

    The model's format (from its suffix) opens it, through the session class its device
    backend uses (``OnnxSession``, ``TfliteSession``).
    """
    run = detect_format(model_path).host_session(model_path).run
    collected: dict[str, list[np.ndarray]] = {}
    for index in range(sample_count(data)):
        for name, value in run(sample(data, index)).items():
            collected.setdefault(name, []).append(value)
    return {name: np.concatenate(values) for name, values in collected.items()}


def reference_outputs(ctx: PassContext) -> dict[str, np.ndarray]:
    """fp32 outputs of the source model on the eval data, computed once per build."""
    if ctx.reference_outputs is None:
        ctx.reference_outputs = run_samples(ctx.source, ctx.evaluation)
    return ctx.reference_outputs


def compare(
    candidate: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    labels: np.ndarray | None,
    classification: bool,
) -> dict[str, float]:
    """Similarity figures of ``candidate`` against ``reference`` (6 significant digits)."""
    cosines = np.concatenate([cosine_rows(candidate[name], reference[name]) for name in reference])
    errors = [np.abs(candidate[n].astype(np.float64) - reference[n]) for n in reference]
    metrics = {
        "cosine_mean": float(cosines.mean()),
        "cosine_min": float(cosines.min()),
        "max_abs_error": float(max(err.max() for err in errors)),
        "mean_abs_error": float(np.mean([err.mean() for err in errors])),
        "reference_max_abs": float(max(np.abs(ref).max() for ref in reference.values())),
    }
    if classification:
        first = next(iter(reference))
        predicted = candidate[first].reshape(len(candidate[first]), -1).argmax(axis=1)
        expected = reference[first].reshape(len(reference[first]), -1).argmax(axis=1)
        metrics["top1_agreement"] = float((predicted == expected).mean())
        if labels is not None:
            metrics["accuracy"] = float((predicted == labels).mean())
            metrics["reference_accuracy"] = float((expected == labels).mean())
            metrics["accuracy_drop"] = metrics["reference_accuracy"] - metrics["accuracy"]
    return {key: float(f"{value:.6g}") for key, value in metrics.items()}


def degradation(metrics: dict[str, float]) -> float:
    """The gate's figure: 1 - top-1 agreement for classifiers, else 1 - mean cosine."""
    if "top1_agreement" in metrics:
        return float(f"{1.0 - metrics['top1_agreement']:.6g}")
    return float(f"{1.0 - metrics['cosine_mean']:.6g}")


class EvaluateConfig(PassConfig):
    max_degradation: float = Field(
        0.01, ge=0, le=1, description="largest allowed degradation (see docs/profiles.md, the gate)"
    )


class Evaluate(Pass):
    """Runs the candidate on the eval data and reports whether it passes the gate."""

    name = "Evaluate"
    Config = EvaluateConfig
    # The formats that can open a model on this host (ONNX, TFLite).
    input_formats = frozenset(n for n, p in formats().items() if p.host_session is not None)

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        reference = reference_outputs(ctx)
        candidate = run_samples(model.path, ctx.evaluation)
        metrics = compare(candidate, reference, ctx.labels, ctx.task == "classification")
        metrics["degradation"] = degradation(metrics)
        metrics["passed"] = metrics["degradation"] <= self.config.max_degradation
        return PassOutput(model, metrics)
