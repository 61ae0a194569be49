"""Scoring a candidate on one eval dataset: one row per output, and the gate's verdict.

Each row has the fields of the manifest's ``OutputScore``. The gate passes when every
row passes; its degradation is the worst row's. Several eval files are scored one at a
time (``eval_file`` names each) and combined with ``combine``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .choose import OutputPlan
from .plugin import Plugin, run_plugin
from .registry import MetricContext, get_metric
from .values import cosine_rows

PLUGIN_OUTPUT = "*"  # the plugin judges the model as a whole, not one output

# What a figure reads when the candidate broke it (NaN, infinity, another shape): the
# manifest's JSON holds finite numbers only.
BROKEN_COSINE = 0.0
BROKEN_ERROR = 1e30


def sig(value: float) -> float:
    """6 significant digits: the manifest records figures, not float noise."""
    return float(f"{value:.6g}")


def _row(output, metric, degradation, threshold, figures, eval_file) -> dict[str, Any]:
    degradation = float(degradation)
    # A metric that could not say (NaN) has not shown the candidate is good.
    degradation = sig(min(1.0, max(0.0, degradation)) if np.isfinite(degradation) else 1.0)
    return {
        "output": output,
        "metric": metric,
        "degradation": degradation,
        "threshold": threshold,
        "passed": degradation <= threshold,
        "eval_file": eval_file,
        "figures": {
            key: sig(value) if np.isfinite(value) else BROKEN_ERROR
            for key, value in figures.items()
        },
    }


def score_output(
    plan: OutputPlan, reference: np.ndarray, candidate: np.ndarray, data, labels
) -> tuple[float, dict[str, float]]:
    """One output's (degradation, figures). A candidate of another shape, or with NaN or
    infinite values where the reference has none, is fully degraded."""
    if candidate.shape != reference.shape:
        return 1.0, {"shape_mismatch": 1.0}
    if candidate.dtype.kind == "f":
        bad = int((~np.isfinite(candidate)).sum() - (~np.isfinite(reference)).sum())
        if bad > 0:
            return 1.0, {"nonfinite_values": float(bad)}
    metric = get_metric(plan.spec.name)
    context = MetricContext(
        output=plan.output,
        data=data,
        labels=labels,
        options=plan.spec.resolved_options(),
        given=frozenset(plan.spec.options),
    )
    return metric.score(reference, candidate, context)


def score_dataset(
    plans: Sequence[OutputPlan],
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    data: Mapping[str, np.ndarray],
    labels,
    *,
    plugin: tuple[str, Plugin] | None = None,
    plugin_threshold: float = 0.01,
    eval_file: str | None = None,
) -> list[dict[str, Any]]:
    """The rows (OutputScore fields) of one eval dataset: the planned outputs, then the
    plugin's verdict on the whole model, if there is one."""
    rows = []
    for plan in plans:
        degradation, figures = score_output(
            plan,
            np.asarray(reference[plan.output]),
            np.asarray(candidate[plan.output]),
            data,
            labels,
        )
        rows.append(
            _row(plan.output, plan.spec.describe(), degradation, plan.threshold, figures, eval_file)
        )
    if plugin is not None:
        spec, function = plugin
        full = dict(data) if labels is None else {**data, "labels": labels}
        degradation, figures = run_plugin(spec, function, reference, candidate, full)
        rows.append(
            _row(PLUGIN_OUTPUT, f"plugin {spec}", degradation, plugin_threshold, figures, eval_file)
        )
    return rows


def summary_figures(
    reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Whole-model figures kept beside the per-output scores, in each attempt's record
    (the self-test's bounds no longer come from them: packager/passes/selftest_vectors.py).
    Outputs the candidate returned in another shape count as fully broken."""
    cosines, max_errors, mean_errors = [], [], []
    for name, ref in reference.items():
        ref, cand = np.asarray(ref), np.asarray(candidate[name])
        if cand.shape != ref.shape:
            cosines.append(np.array([BROKEN_COSINE]))
            max_errors.append(BROKEN_ERROR)
            mean_errors.append(BROKEN_ERROR)
            continue
        cosines.append(cosine_rows(cand, ref))
        error = np.abs(cand.astype(np.float64) - ref.astype(np.float64))
        max_errors.append(float(error.max()) if error.size else 0.0)
        mean_errors.append(float(error.mean()) if error.size else 0.0)
    every = np.concatenate(cosines) if cosines else np.ones(1)
    every = np.where(np.isfinite(every), every, BROKEN_COSINE)
    figures = {
        "cosine_mean": float(every.mean()),
        "cosine_min": float(every.min()),
        "max_abs_error": max(max_errors, default=0.0),
        "mean_abs_error": float(np.mean(mean_errors)) if mean_errors else 0.0,
        "reference_max_abs": float(
            max((np.abs(np.asarray(r)).max() for r in reference.values() if np.size(r)), default=0)
        ),
    }
    return {
        key: sig(value if np.isfinite(value) else BROKEN_ERROR) for key, value in figures.items()
    }


def worst_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The row that decides the verdict: the failing one furthest over its threshold,
    else the one with the highest degradation."""
    if not rows:
        return None
    return max(rows, key=lambda r: (not r["passed"], r["degradation"] - r["threshold"]))


def combine(
    rows: Sequence[Mapping[str, Any]], summaries: Sequence[Mapping[str, float]]
) -> dict[str, Any]:
    """The Evaluate pass's figures from every dataset's rows and summary figures.

    ``degradation`` is the worst row's (over outputs and datasets), ``passed`` whether
    every row passed, ``outputs`` the rows. The summary figures take the worst over
    datasets; the worst row's own figures are added where they do not clash (so a
    classifier's ``top1_agreement`` sits among the attempt's figures).
    """
    figures: dict[str, Any] = {}
    for summary in summaries:
        for key, value in summary.items():
            better_high = key.startswith("cosine")
            if key not in figures:
                figures[key] = value
            else:
                figures[key] = min(figures[key], value) if better_high else max(figures[key], value)
    worst = worst_row(rows)
    if worst is not None:
        for key, value in worst["figures"].items():
            figures.setdefault(key, value)
    figures["degradation"] = max((row["degradation"] for row in rows), default=0.0)
    figures["passed"] = all(row["passed"] for row in rows)
    figures["outputs"] = [dict(row) for row in rows]
    return figures
