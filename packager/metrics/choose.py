"""Which metric judges which output: ``--metric`` first, then ``--task``, then auto.

``auto`` looks at each output's reference values on the eval data:

1. integer or boolean values -> ``exact``;
2. one value per sample, or per step ([samples, steps, 1]) -> ``relative-error`` (a
   cosine of one value is always 1);
3. ``labels`` in the eval file and a [samples, classes] output whose argmax matches at
   least half of them on the float model -> ``top1``;
4. up to ``FEW_VALUES`` values per sample -> ``relative-error``;
5. [samples, tokens, features] with a mask input (a name holding "mask") ->
   ``cosine-tokens``;
6. channels whose magnitudes differ by ``GROUP_RATIO`` or more along an axis ->
   ``channel-groups``;
7. otherwise ``cosine``.

A task claims the outputs that look like what it is for (``TASK_SHAPES``) and leaves the
others to auto; it is an error when none does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import PackagerError
from .detection import detection_layout
from .registry import MetricSpec, get_metric
from .values import GROUP_RATIO, find_mask, widest_gap_axis

# At most this many values per sample read as separate quantities (a score, a box), not
# as a vector whose direction a cosine could judge.
FEW_VALUES = 4
# A classifier's float model is right on at least this share of its own eval labels.
LABELLED_ACCURACY = 0.5


@dataclass(frozen=True)
class OutputPlan:
    """How one output is judged: the metric (with its options) and the threshold."""

    output: str
    spec: MetricSpec
    threshold: float


def auto_metric(output: str, reference: np.ndarray, data: Mapping[str, Any], labels) -> str:
    """The metric ``auto`` picks for one output (see the module docstring)."""
    per_sample = int(np.prod(reference.shape[1:])) if reference.ndim > 1 else 1
    if reference.dtype.kind in "biu":
        return "exact"
    if per_sample == 1 or (reference.ndim > 2 and reference.shape[-1] == 1):
        return "relative-error"  # one value per sample (or per step of a stateful model)
    if labels is not None and reference.ndim == 2 and _predicts_labels(reference, labels):
        return "top1"
    if per_sample <= FEW_VALUES:
        return "relative-error"
    if reference.ndim == 3 and find_mask(reference, data, "", output)[1] is not None:
        return "cosine-tokens"
    if widest_gap_axis(reference, GROUP_RATIO) is not None:
        return "channel-groups"
    return "cosine"


def _predicts_labels(reference: np.ndarray, labels) -> bool:
    """Whether a [samples, classes] output is what the ``labels`` grade: the float model's
    argmax matches at least ``LABELLED_ACCURACY`` of them (an embedding beside the class
    scores does not, and is left to the other rules)."""
    labels = np.asarray(labels)
    if labels.shape != reference.shape[:1] or labels.dtype.kind not in "iu":
        return False
    return float((reference.argmax(axis=1) == labels).mean()) >= LABELLED_ACCURACY


def _class_scores(ref: np.ndarray) -> bool:
    return ref.ndim == 2 and ref.shape[1] >= 2 and ref.dtype.kind == "f"


def _embedding(ref: np.ndarray) -> str | None:
    if ref.ndim == 3:
        # Per token, not pooled: a per-token output promises every real token's vector,
        # and a pooled cosine can pass while single tokens drift (cosine-pooled by --metric).
        return "cosine-tokens"
    if ref.ndim == 2 and ref.shape[1] > FEW_VALUES:
        return "cosine"
    return None


# task -> (what its outputs look like, in words; output reference -> metric or None)
TASK_SHAPES = {
    "classification": (
        "class scores [samples, classes]",
        lambda ref: "top1" if _class_scores(ref) else None,
    ),
    "embedding": (
        "[samples, tokens, features] or [samples, features]",
        _embedding,
    ),
    "detection": (
        "[samples, 4 + classes, anchors] or [samples, anchors, 4 + classes]",
        lambda ref: "detection" if detection_layout(tuple(ref.shape)) else None,
    ),
    "dense": (
        "a map [samples, (channels,) height, width]",
        lambda ref: "dense" if ref.ndim >= 3 and ref.dtype.kind == "f" else None,
    ),
    "sequence": (
        "[samples, steps, classes]",
        lambda ref: "sequence" if ref.ndim == 3 and ref.dtype.kind == "f" else None,
    ),
    "regression": ("any output", lambda ref: "regression"),
    "generic": ("any output", lambda ref: "cosine"),
}


def task_metrics(task: str, reference: Mapping[str, np.ndarray]) -> dict[str, str]:
    """The outputs ``task`` claims, with their metric. PackagerError when it claims none."""
    if task == "auto":
        return {}
    words, pick = TASK_SHAPES[task]
    claimed = {name: metric for name, ref in reference.items() if (metric := pick(ref))}
    if task == "detection":  # one detector head; other outputs (e.g. masks) go to auto
        claimed = dict(list(claimed.items())[:1])
    if not claimed:
        shapes = ", ".join(f"{name} {list(ref.shape)}" for name, ref in reference.items())
        raise PackagerError(
            f"--task {task}: no output looks like {words}; the outputs are {shapes} (on the "
            "eval data). Name the metric per output with --metric OUTPUT=NAME, or use "
            "--task auto"
        )
    return claimed


def threshold_for(spec: MetricSpec, max_degradation: float, threshold_given: bool) -> float:
    """An output's threshold: ``max=`` in its --metric, else the metric's own default
    (when --max-degradation was not given), else --max-degradation."""
    if spec.threshold is not None:
        return spec.threshold
    own = get_metric(spec.name).threshold
    if own is not None and not threshold_given:
        return own
    return max_degradation


def plan_outputs(
    reference: Mapping[str, np.ndarray],
    data: Mapping[str, Any],
    labels,
    *,
    task: str,
    overrides: Mapping[str, MetricSpec],
    plugin: bool,
    max_degradation: float,
    threshold_given: bool,
) -> list[OutputPlan]:
    """One plan per output that built-in metrics score, in output order.

    With a metric plugin, only the outputs named with --metric get a built-in metric:
    the plugin judges the rest.
    """
    claimed = {} if plugin else task_metrics(task, reference)
    plans = []
    for name, ref in reference.items():
        if name in overrides:
            spec = overrides[name]
        elif plugin:
            continue
        else:
            spec = MetricSpec(claimed.get(name) or auto_metric(name, ref, data, labels))
        plans.append(OutputPlan(name, spec, threshold_for(spec, max_degradation, threshold_given)))
    return plans


def parse_overrides(metric: Mapping[str, str]) -> dict[str, MetricSpec]:
    """``--metric OUTPUT=SPEC`` values parsed (PackagerError for an unknown metric or
    option); output names are checked against the model once it is loaded."""
    return {
        output: MetricSpec.parse(text, f"--metric {output}={text}")
        for output, text in metric.items()
    }


def check_names(overrides: Mapping[str, MetricSpec], outputs: list[str], inputs: list[str]) -> None:
    """PackagerError for a --metric output the model does not have, or a mask option
    naming an input it does not have."""
    unknown = sorted(set(overrides) - set(outputs))
    if unknown:
        raise PackagerError(
            f"--metric names output {', '.join(map(repr, unknown))}, which the model does not "
            f"have; its outputs: {', '.join(outputs)}"
        )
    for output, spec in overrides.items():
        mask = spec.options.get("mask")
        if mask and mask not in inputs:
            raise PackagerError(
                f"--metric {output}={spec.describe()}: mask input {mask!r} is not a model "
                f"input; its inputs: {', '.join(inputs)}"
            )
