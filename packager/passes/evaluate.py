"""Evaluate: compare a candidate with the fp32 reference on the held-out eval data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from edge_runtime.selftest import cosine_rows

from ..data import DataSet, plain_dataset
from ..formats import detect_format, formats
from .base import ModelArtifact, Pass, PassConfig, PassContext, PassOutput


def run_dataset(model_path: Path, dataset: DataSet) -> dict[str, np.ndarray]:
    """Run every sample of ``dataset`` on the host CPU, one at a time, fed as its feeder
    says (batch axes, constants, carried state); outputs with one row per sample.

    The model's format (from its suffix) opens it, through the session class its device
    backend uses (``OnnxSession``, ``TfliteSession``).
    """
    return dataset.run(detect_format(model_path).host_session(model_path).run)


def run_samples(model_path: Path, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run every sample of plain arrays (batch of one on axis 0); stack the outputs."""
    return run_dataset(model_path, plain_dataset(data))


def reference_outputs(ctx: PassContext, dataset: DataSet | None = None) -> dict[str, np.ndarray]:
    """fp32 outputs of the source model on one eval file (default: the first), computed
    once per build."""
    sets = ctx.eval_sets
    dataset = dataset or sets[0]
    if dataset.reference is None:
        dataset.reference = run_dataset(ctx.source, dataset)
    if dataset is sets[0]:
        ctx.reference_outputs = dataset.reference
    return dataset.reference


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
        # Each eval file (one per resolution) is scored; the gate takes the worst.
        scored = []
        for dataset in ctx.eval_sets:
            reference = reference_outputs(ctx, dataset)
            candidate = run_dataset(model.path, dataset)
            figures = compare(candidate, reference, dataset.labels, ctx.task == "classification")
            figures["degradation"] = degradation(figures)
            scored.append((dataset, figures))
        metrics = dict(max(scored, key=lambda item: item[1]["degradation"])[1])
        if len(scored) > 1:
            for dataset, figures in scored:
                metrics[f"degradation[{dataset.path.name}]"] = figures["degradation"]
                ctx.progress(f"  {dataset.path.name}: degradation {figures['degradation']:.4g}")
        metrics["passed"] = metrics["degradation"] <= self.config.max_degradation
        return PassOutput(model, metrics)
