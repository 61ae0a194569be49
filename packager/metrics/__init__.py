"""Gate metrics: each output of a candidate scored on its own, by a metric that fits it.

``registry`` holds the metrics by name and the ``--metric OUTPUT=NAME:KEY=VALUE`` syntax;
``values``, ``decisions`` and ``detection`` register the built-ins; ``choose`` picks a
metric per output (``--metric``, then ``--task``, then auto); ``plugin`` loads a user's
metric; ``score`` scores a dataset and combines the verdicts. See docs/quantization.md.
"""

from __future__ import annotations

from . import decisions, detection, values  # noqa: F401  (they register the built-ins)
from .choose import OutputPlan, auto_metric, check_names, parse_overrides, plan_outputs
from .plugin import ENTRY_POINT_GROUP, load_plugin, run_plugin
from .registry import METRICS, Metric, MetricContext, MetricSpec, get_metric, metric_names, register
from .score import PLUGIN_OUTPUT, combine, score_dataset, summary_figures, worst_row

__all__ = [
    "ENTRY_POINT_GROUP",
    "METRICS",
    "PLUGIN_OUTPUT",
    "Metric",
    "MetricContext",
    "MetricSpec",
    "OutputPlan",
    "auto_metric",
    "check_names",
    "check_settings",
    "combine",
    "get_metric",
    "load_plugin",
    "metric_names",
    "parse_overrides",
    "plan_outputs",
    "register",
    "run_plugin",
    "score_dataset",
    "summary_figures",
    "worst_row",
]


def check_settings(metric: dict[str, str], metric_plugin: str | None) -> None:
    """Before any work: every --metric names a known metric with known options, and the
    plugin imports. PackagerError otherwise."""
    parse_overrides(metric)
    if metric_plugin:
        load_plugin(metric_plugin)
