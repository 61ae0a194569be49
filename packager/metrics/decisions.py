"""Metrics on the decisions an output leads to: top-1 class, per-step classes, a map's
thresholded region. What matters is whether the candidate decides as the reference did,
not how close its numbers are.
"""

from __future__ import annotations

import numpy as np

from ..errors import PackagerError
from .registry import MetricContext, register
from .values import find_mask


def _class_axis(reference: np.ndarray, axis: int, output: str, metric: str) -> int:
    """``axis`` as a positive index; PackagerError unless it is a class axis with two
    classes or more (any axis but the samples')."""
    position = axis % reference.ndim if -reference.ndim <= axis < reference.ndim else 0
    if reference.ndim < 2 or position == 0:
        raise PackagerError(
            f"output {output!r} has shape {list(reference.shape)}; {metric} needs a class "
            f"axis other than the samples' (axis={axis})"
        )
    if reference.shape[position] < 2:
        raise PackagerError(
            f"output {output!r} has one value on axis {position}; {metric} needs two classes "
            "or more (relative-error suits one value per sample)"
        )
    return position


@register(
    "top1",
    "1 - top-1 agreement with the reference on the class axis (last by default); with "
    "labels, the accuracy drop too",
    options={"axis": -1},
)
def top1(reference, candidate, ctx: MetricContext):
    axis = _class_axis(reference, ctx.options["axis"], ctx.output, "top1")
    expected = reference.argmax(axis=axis)
    predicted = candidate.argmax(axis=axis)
    agreement = float((predicted == expected).mean())
    figures = {"top1_agreement": agreement}
    labels = ctx.labels
    if labels is not None and np.shape(labels) == expected.shape:
        figures["accuracy"] = float((predicted == labels).mean())
        figures["reference_accuracy"] = float((expected == labels).mean())
        figures["accuracy_drop"] = figures["reference_accuracy"] - figures["accuracy"]
    return 1.0 - agreement, figures


def _collapse(path: np.ndarray, blank: int) -> tuple[int, ...]:
    """A CTC path as the sequence it reads: repeats merged, then blanks dropped."""
    if path.size == 0:
        return ()
    keep = np.concatenate([[True], path[1:] != path[:-1]])
    return tuple(int(step) for step in path[keep] if step != blank)


def ctc_blank(expected: np.ndarray, mask: np.ndarray, classes: int, option: str, output: str):
    """The CTC blank class, or None for a sequence read step by step. ``option``: "auto"
    (class 0 or the last class, when it is the reference's choice on over half the real
    steps, as a CTC blank is), "none", or the class number."""
    if option == "none":
        return None
    if option != "auto":
        try:
            return int(option)
        except ValueError:
            raise PackagerError(
                f"output {output!r}: sequence blank={option!r} must be auto, none or a class number"
            ) from None
    chosen = expected[mask]
    if chosen.size == 0:
        return None
    counts = np.bincount(chosen, minlength=classes)
    common = int(counts.argmax())
    return common if common in (0, classes - 1) and counts[common] > chosen.size / 2 else None


@register(
    "sequence",
    "per-step argmax over the class axis: with a CTC blank (found or given), 1 - the share "
    "of sequences that read the same (collapsed); without, 1 - per-step agreement",
    options={"axis": -1, "blank": "auto", "mask": ""},
    threshold=0.05,
)
def sequence(reference, candidate, ctx: MetricContext):
    if reference.ndim < 3:
        raise PackagerError(
            f"output {ctx.output!r} has shape {list(reference.shape)}; sequence needs "
            "[samples, steps, classes] (top1 suits one decision per sample)"
        )
    axis = _class_axis(reference, ctx.options["axis"], ctx.output, "sequence")
    expected = reference.argmax(axis=axis).reshape(len(reference), -1)
    predicted = candidate.argmax(axis=axis).reshape(len(candidate), -1)
    _, mask = find_mask(expected, ctx.data, ctx.options["mask"], ctx.output)
    if mask is None:
        mask = np.ones(expected.shape, dtype=bool)
    steps = int(mask.sum())
    step_agreement = float(((expected == predicted) & mask).sum() / steps) if steps else 1.0
    blank = ctc_blank(expected, mask, reference.shape[axis], ctx.options["blank"], ctx.output)
    if blank is None:
        whole = list(((expected == predicted) | ~mask).all(axis=1))
    else:
        whole = [
            _collapse(e[m], blank) == _collapse(p[m], blank)
            for e, p, m in zip(expected, predicted, mask, strict=True)
        ]
    sequence_agreement = float(np.mean(whole)) if whole else 1.0
    figures = {
        "step_agreement": step_agreement,
        "sequence_agreement": sequence_agreement,
        "steps": float(steps),
        "blank": -1.0 if blank is None else float(blank),
    }
    # A CTC reading survives steps that shift at a character's edge: judge the readings.
    return 1.0 - (step_agreement if blank is None else sequence_agreement), figures


@register(
    "dense",
    "1 - IoU of the map thresholded at 0.3 (probability maps; threshold=V for others)",
    options={"threshold": 0.3},
    threshold=0.1,
)
def dense(reference, candidate, ctx: MetricContext):
    threshold = ctx.options["threshold"]
    declared = "threshold" in ctx.given
    low, high = float(reference.min()), float(reference.max())
    if not declared and (low < 0 or high > 1):
        raise PackagerError(
            f"output {ctx.output!r} holds values from {low:.3g} to {high:.3g}, not a "
            "probability map; give the threshold for its region, e.g. --metric "
            f"{ctx.output}=dense:threshold=0 for logits"
        )
    expected = reference > threshold
    predicted = candidate > threshold
    union = int((expected | predicted).sum())
    iou = float((expected & predicted).sum() / union) if union else 1.0
    return 1.0 - iou, {
        "iou": iou,
        "threshold": float(threshold),
        "reference_positive": float(expected.mean()),
        "candidate_positive": float(predicted.mean()),
    }
