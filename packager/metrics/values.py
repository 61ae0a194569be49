"""Metrics on the values of an output: cosines, relative error, channel groups, exact match.

All take the reference and candidate as arrays with samples on axis 0 and return
``(degradation, figures)`` (see ``registry``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import PackagerError
from .registry import MetricContext, register

# Channels whose largest magnitudes are this far apart (a gap between two neighbours once
# sorted) are different quantities, scored apart: box coordinates (0..320, widths maybe
# only up to 40 px on an eval set of small objects) beside class scores (0..0.9).
GROUP_RATIO = 20.0
# A channel below this fraction of the largest one counts as (nearly) zero: it joins the
# smallest group instead of opening a gap of its own (dead features, a rare class).
ZERO_SCALE = 1e-4
# Groups must keep their order in this share of the samples to count as different
# quantities rather than places where some samples happen to be large.
CONSISTENT_SHARE = 0.9


def cosine_rows(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarity per sample (axis 0), the rest flattened. Two all-zero rows are
    identical (1); one all-zero row against a non-zero one is nothing like it (0): a
    quantizer that crushes a group of values to zero must not look perfect."""
    a = candidate.reshape(len(candidate), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    norms = norm_a * norm_b
    dots = (a * b).sum(axis=1)
    both_zero = (norm_a == 0) & (norm_b == 0)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1), both_zero.astype(float))


def _cosine_figures(cosines: np.ndarray) -> tuple[float, dict[str, float]]:
    if cosines.size == 0:  # nothing to compare (e.g. a mask with no real token)
        return 0.0, {"cosine_mean": 1.0, "cosine_min": 1.0}
    mean = float(cosines.mean())
    return min(1.0, max(0.0, 1.0 - mean)), {"cosine_mean": mean, "cosine_min": float(cosines.min())}


@register("cosine", "1 - mean cosine similarity per sample (each sample's values flattened)")
def cosine(reference, candidate, ctx: MetricContext):
    return _cosine_figures(cosine_rows(candidate, reference))


def find_mask(
    reference: np.ndarray, data: Mapping[str, Any], declared: str, output: str
) -> tuple[str | None, np.ndarray | None]:
    """The mask of real tokens for a [samples, tokens, ...] output: the input ``declared``
    names, else the first input whose name holds "mask" and whose shape is [samples,
    tokens]. (None, None) when there is none. PackagerError when the declared input is
    missing or has the wrong shape."""
    wanted = tuple(reference.shape[:2])
    if declared:
        if declared not in data:
            raise PackagerError(
                f"output {output!r}: mask input {declared!r} is not an eval input; inputs: "
                f"{', '.join(sorted(data))}"
            )
        mask = np.asarray(data[declared])
        if tuple(mask.shape) != wanted:
            raise PackagerError(
                f"output {output!r} has shape {list(reference.shape)} but mask input "
                f"{declared!r} has {list(mask.shape)}; the mask needs [samples, tokens] = "
                f"{list(wanted)}"
            )
        return declared, mask != 0
    for name, value in data.items():
        if "mask" in name.lower() and tuple(np.shape(value)) == wanted:
            return name, np.asarray(value) != 0
    return None, None


def _tokens(reference: np.ndarray, output: str, metric: str) -> None:
    if reference.ndim < 3:
        raise PackagerError(
            f"output {output!r} has shape {list(reference.shape)}; {metric} needs [samples, "
            "tokens, features] (use cosine for one vector per sample)"
        )


@register(
    "cosine-tokens",
    "1 - mean cosine per token, over real tokens only (mask: an input named *mask*)",
    options={"mask": ""},
)
def cosine_tokens(reference, candidate, ctx: MetricContext):
    _tokens(reference, ctx.output, "cosine-tokens")
    name, mask = find_mask(reference, ctx.data, ctx.options["mask"], ctx.output)
    samples, tokens = reference.shape[:2]
    ref = reference.reshape(samples * tokens, -1)
    cand = candidate.reshape(samples * tokens, -1)
    if mask is not None:
        keep = mask.reshape(-1)
        ref, cand = ref[keep], cand[keep]
    degradation, figures = _cosine_figures(cosine_rows(cand, ref))
    figures["tokens"] = float(len(ref))
    figures["masked"] = float(mask is not None)
    return degradation, figures


@register(
    "cosine-pooled",
    "1 - mean cosine of mask-aware mean-pooled token vectors (sentence embeddings)",
    options={"mask": ""},
)
def cosine_pooled(reference, candidate, ctx: MetricContext):
    _tokens(reference, ctx.output, "cosine-pooled")
    name, mask = find_mask(reference, ctx.data, ctx.options["mask"], ctx.output)
    samples, tokens = reference.shape[:2]
    weights = np.ones((samples, tokens)) if mask is None else mask.astype(np.float64)
    weights = weights.reshape(samples, tokens, *([1] * (reference.ndim - 2)))
    counts = np.maximum(weights.sum(axis=1), 1.0)
    pooled_ref = (reference.astype(np.float64) * weights).sum(axis=1) / counts
    pooled_cand = (candidate.astype(np.float64) * weights).sum(axis=1) / counts
    degradation, figures = _cosine_figures(cosine_rows(pooled_cand, pooled_ref))
    figures["masked"] = float(mask is not None)
    return degradation, figures


def relative_error_figures(
    reference: np.ndarray, candidate: np.ndarray, quantile: float
) -> tuple[float, dict[str, float]]:
    """degradation = the ``quantile`` of |candidate - reference| over every value, divided
    by the reference's range (max - min over the eval set; its largest magnitude when it
    is constant), capped at 1."""
    ref = reference.astype(np.float64).ravel()
    errors = np.abs(candidate.astype(np.float64).ravel() - ref)
    if errors.size == 0:
        return 0.0, {}
    scale = float(ref.max() - ref.min()) or float(np.abs(ref).max())
    robust = float(np.quantile(errors, quantile))
    # A constant zero reference has no scale: any error at all is total.
    degradation = min(1.0, robust / scale) if scale > 0 else float(robust > 0)
    return degradation, {
        "max_abs_error": float(errors.max()),
        "quantile_abs_error": robust,
        "mean_abs_error": float(errors.mean()),
        "reference_range": scale,
    }


@register(
    "relative-error",
    "the 99th percentile of |candidate - reference| over the reference's range (for one "
    "or a few values per sample)",
    options={"quantile": 0.99},
)
def relative_error(reference, candidate, ctx: MetricContext):
    quantile = ctx.options["quantile"]
    if not 0 < quantile <= 1:
        raise PackagerError(f"output {ctx.output!r}: relative-error quantile must be in (0, 1]")
    return relative_error_figures(reference, candidate, quantile)


@register(
    "regression",
    "the regression task's metric: relative-error (99th percentile of the error over the "
    "reference's range)",
    options={"quantile": 0.99},
)
def regression(reference, candidate, ctx: MetricContext):
    return relative_error(reference, candidate, ctx)


@register("exact", "1 - the share of samples whose values are all equal (integer outputs)")
def exact(reference, candidate, ctx: MetricContext):
    samples = len(reference)
    equal = reference.reshape(samples, -1) == candidate.reshape(samples, -1)
    agreement = float(equal.all(axis=1).mean()) if samples else 1.0
    return 1.0 - agreement, {
        "exact_agreement": agreement,
        "element_agreement": float(equal.mean()) if equal.size else 1.0,
    }


def channel_scales(reference: np.ndarray, axis: int) -> np.ndarray:
    """Each channel's largest magnitude along ``axis`` (over samples and other axes)."""
    moved = np.moveaxis(np.abs(reference.astype(np.float64)), axis, 0)
    return moved.reshape(moved.shape[0], -1).max(axis=1)


def channel_groups(scales: np.ndarray, ratio: float) -> list[np.ndarray]:
    """Channel indices grouped by magnitude: sorted by scale, a new group starts wherever
    one scale is ``ratio`` times the next smaller one. Channels at (near) zero join the
    smallest group. One group when no such gap exists."""
    top = float(scales.max()) if scales.size else 0.0
    live = np.flatnonzero(scales > top * ZERO_SCALE) if top > 0 else np.arange(0)
    if live.size < 2:
        return [np.arange(len(scales))]
    order = live[np.argsort(-scales[live], kind="stable")]
    cuts = [0]
    for position in range(1, len(order)):
        if scales[order[position - 1]] >= ratio * scales[order[position]]:
            cuts.append(position)
    cuts.append(len(order))
    groups = [np.sort(order[start:end]) for start, end in zip(cuts, cuts[1:], strict=False)]
    dead = np.setdiff1d(np.arange(len(scales)), live)
    if dead.size:
        groups[-1] = np.sort(np.concatenate([groups[-1], dead]))
    return groups


def consistent_groups(reference: np.ndarray, axis: int, groups: list[np.ndarray]) -> bool:
    """Whether the groups are the same quantities in (nearly) every sample: in at least
    ``CONSISTENT_SHARE`` of the samples each group's smallest channel still exceeds the
    next group's largest. Box coordinates beside class scores are; the rows of a text
    map, large where a sample happens to have text, are not."""
    moved = np.moveaxis(np.abs(reference.astype(np.float64)), axis, 1)
    per_sample = moved.reshape(moved.shape[0], moved.shape[1], -1).max(axis=2)
    for larger, smaller in zip(groups, groups[1:], strict=False):
        above = per_sample[:, larger].min(axis=1) > per_sample[:, smaller].max(axis=1)
        if above.mean() < CONSISTENT_SHARE:
            return False
    return True


def widest_gap_axis(reference: np.ndarray, ratio: float = GROUP_RATIO) -> int | None:
    """The axis (not the samples') along which channels fall into more than one magnitude
    group, the same way in nearly every sample, preferring the one with the fewest
    channels; None when there is none."""
    best = None
    for axis in range(1, reference.ndim):
        size = reference.shape[axis]
        if size < 2 or reference.size == 0 or (best is not None and size >= reference.shape[best]):
            continue
        groups = channel_groups(channel_scales(reference, axis), ratio)
        if len(groups) > 1 and consistent_groups(reference, axis, groups):
            best = axis
    return best


def declared_groups(split: str, size: int, output: str) -> list[np.ndarray]:
    """Contiguous channel groups starting at the indices ``split`` lists ("4" or "4,10")."""
    try:
        starts = sorted({int(part) for part in split.split(";") if part.strip()})
    except ValueError:
        starts = [-1]
    if not starts or starts[0] <= 0 or starts[-1] >= size:
        raise PackagerError(
            f"output {output!r}: channel-groups split={split!r} must list channels between 1 "
            f"and {size - 1} where a new group starts, separated by ';' (e.g. split=4)"
        )
    bounds = [0, *starts, size]
    return [np.arange(start, end) for start, end in zip(bounds, bounds[1:], strict=False)]


@register(
    "channel-groups",
    "channels of very different magnitudes (a 20x gap, or split=K;L declared) scored apart, "
    "1 - cosine per group; the worst group counts",
    options={"axis": 0, "ratio": GROUP_RATIO, "split": ""},
)
def channel_group_cosine(reference, candidate, ctx: MetricContext):
    ratio, split = ctx.options["ratio"], ctx.options["split"]
    axis = ctx.options["axis"] or (1 if split else widest_gap_axis(reference, ratio))
    if axis is None:  # one magnitude everywhere: one group, a plain cosine
        degradation, figures = cosine(reference, candidate, ctx)
        return degradation, {**figures, "groups": 1.0}
    if not 0 < axis < reference.ndim:
        raise PackagerError(
            f"output {ctx.output!r} has {reference.ndim} axes; channel-groups axis must be "
            f"1..{reference.ndim - 1}"
        )
    scales = channel_scales(reference, axis)
    if split:
        groups = declared_groups(split, reference.shape[axis], ctx.output)
    else:
        groups = channel_groups(scales, ratio)
    figures: dict[str, float] = {"groups": float(len(groups)), "axis": float(axis)}
    worst = 0.0
    for index, channels in enumerate(groups):
        ref = np.take(reference, channels, axis=axis)
        cand = np.take(candidate, channels, axis=axis)
        degradation, group = _cosine_figures(cosine_rows(cand, ref))
        figures[f"group{index}_channels"] = float(len(channels))
        figures[f"group{index}_first_channel"] = float(channels[0])
        figures[f"group{index}_scale"] = float(scales[channels].max())
        figures[f"group{index}_cosine_mean"] = group["cosine_mean"]
        worst = max(worst, degradation)
    return worst, figures
