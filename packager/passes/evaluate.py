"""Evaluate: compare a candidate with the fp32 reference on the held-out eval data.

Each output is scored by its own metric (``packager.metrics``: ``--metric``, ``--task``,
or chosen from the output's shape and values); the candidate passes when every output
passes, and its degradation is the worst output's. Several eval datasets: call
``Evaluate.score`` once per dataset and ``packager.metrics.combine`` on all the rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from ..data import DataSet, plain_dataset
from ..formats import detect_format, formats
from ..metrics import (
    combine,
    load_plugin,
    parse_overrides,
    plan_outputs,
    score_dataset,
    summary_figures,
)
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


class EvaluateConfig(PassConfig):
    max_degradation: float = Field(
        0.01, ge=0, le=1, description="largest allowed degradation (see docs/quantization.md)"
    )
    max_degradation_given: bool = Field(
        False,
        description="--max-degradation was given: it overrides a metric's own default threshold",
    )
    task: str = Field("auto", description="--task: which metric each output gets")
    metric: dict[str, str] = Field(
        default_factory=dict, description="--metric OUTPUT=NAME overrides, by output"
    )
    metric_plugin: str | None = Field(
        None, description="--metric-plugin: a user metric that judges the whole model"
    )


class Evaluate(Pass):
    """Runs the candidate on the eval data and scores each output against the source's
    (packager.metrics); it passes when every output does."""

    name = "Evaluate"
    Config = EvaluateConfig
    # The formats that can open a model on this host (ONNX, TFLite).
    input_formats = frozenset(n for n, p in formats().items() if p.host_session is not None)

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self._plugin = None

    def plugin(self):
        """(spec, function) of the metric plugin, loaded once; None without one."""
        spec = self.config.metric_plugin
        if spec and self._plugin is None:
            self._plugin = (spec, load_plugin(spec))
        return self._plugin

    def score(
        self,
        reference: dict[str, np.ndarray],
        candidate: dict[str, np.ndarray],
        data: dict[str, np.ndarray],
        labels,
        eval_file: str | None = None,
    ) -> tuple[list[dict], dict[str, float]]:
        """One eval dataset's rows (OutputScore fields) and whole-model summary figures."""
        config = self.config
        plans = plan_outputs(
            reference,
            data,
            labels,
            task=config.task,
            overrides=parse_overrides(config.metric),
            plugin=config.metric_plugin is not None,
            max_degradation=config.max_degradation,
            threshold_given=config.max_degradation_given,
        )
        rows = score_dataset(
            plans,
            reference,
            candidate,
            data,
            labels,
            plugin=self.plugin(),
            plugin_threshold=config.max_degradation,
            eval_file=eval_file,
        )
        return rows, summary_figures(reference, candidate)

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        # Each eval file (one per resolution) is scored; the gate takes the worst row.
        many = len(ctx.eval_sets) > 1
        rows, summaries = [], []
        for dataset in ctx.eval_sets:
            reference = reference_outputs(ctx, dataset)
            candidate = run_dataset(model.path, dataset)
            name = dataset.path.name if many else None
            found, summary = self.score(
                reference, candidate, dataset.arrays, dataset.labels, eval_file=name
            )
            rows.extend(found)
            summaries.append(summary)
            if many:
                worst = max((row["degradation"] for row in found), default=0.0)
                ctx.progress(f"  {name}: worst degradation {worst:.4g}")
        return PassOutput(model, combine(rows, summaries))
