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

from ..data import sample, sample_count
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
        reference = reference_outputs(ctx)
        candidate = run_samples(model.path, ctx.evaluation)
        rows, summary = self.score(reference, candidate, ctx.evaluation, ctx.labels)
        return PassOutput(model, combine(rows, [summary]))
