"""The detection metric: YOLO-style outputs decoded, put through NMS, and matched.

The output holds, per anchor, a box (cx, cy, w, h) and one score per class (YOLOv8:
[samples, 4 + classes, anchors]; or transposed, [samples, anchors, 4 + classes];
YOLOv5-style outputs add an objectness column: ``objectness=1``; YOLO-seg rows go on
with mask coefficients: ``classes=C`` counts only the first C scores). Both models' outputs
are decoded the same way: anchors whose best class score reaches ``score_threshold``,
class-aware non-maximum suppression at ``nms_iou``. The candidate's detections are then
matched to the reference's (same class, IoU >= ``match_iou``, greedily by confidence).

degradation = 1 - min(recall, precision): a candidate that loses detections (recall)
and one that invents them (precision) are both caught, and the figure reads as "the
share of the float model's detections lost or invented", whichever is worse.
"""

from __future__ import annotations

import numpy as np

from ..errors import PackagerError
from .registry import MetricContext, register

LAYOUTS = ("auto", "channels-first", "channels-last")


def detection_layout(shape: tuple[int, ...], layout: str = "auto") -> str | None:
    """ "channels-first" ([samples, 4 + C, anchors]) or "channels-last" for a detector
    output shape; None when ``shape`` is not one (auto: the smaller axis holds the box
    and scores, at least 5 values)."""
    if len(shape) != 3:
        return None
    channels, anchors = shape[1], shape[2]
    if layout == "channels-first":
        return layout if channels >= 5 else None
    if layout == "channels-last":
        return layout if anchors >= 5 else None
    if 5 <= channels < anchors:
        return "channels-first"
    if 5 <= anchors < channels:
        return "channels-last"
    return None


def xyxy(boxes: np.ndarray) -> np.ndarray:
    """cx, cy, w, h -> x1, y1, x2, y2."""
    half = boxes[:, 2:4] / 2
    return np.concatenate([boxes[:, 0:2] - half, boxes[:, 0:2] + half], axis=1)


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x1y1x2y2 box with each of ``boxes``."""
    top_left = np.maximum(box[:2], boxes[:, :2])
    bottom_right = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
    area = np.prod(np.clip(box[2:] - box[:2], 0, None))
    areas = np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=1)
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by class-aware greedy non-maximum suppression, best score first.

    Boxes of different classes never suppress each other: each class's boxes are moved
    to a region of their own before one greedy pass (the usual offset trick).
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    span = float(np.abs(boxes).max()) * 2 + 1
    shifted = boxes + (classes.astype(np.float64) * span)[:, None]
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best = order[0]
        keep.append(best)
        rest = order[1:]
        order = rest[iou_one_to_many(shifted[best], shifted[rest]) <= iou]
    return np.asarray(keep, dtype=np.int64)


def decode(
    anchors: np.ndarray,
    score_threshold: float,
    nms_iou: float,
    objectness: bool,
    limit: int,
    classes: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sample's [anchors, 4 + C] rows -> (x1y1x2y2 boxes, classes, confidences)
    after the score threshold and class-aware NMS, at most ``limit`` candidates. With
    ``classes`` > 0 only that many score columns count (YOLO-seg rows go on with mask
    coefficients)."""
    rows = anchors.astype(np.float64)
    first = 5 if objectness else 4
    scores = rows[:, first : first + classes] if classes else rows[:, first:]
    if objectness:
        scores = scores * rows[:, 4:5]
    classes = scores.argmax(axis=1)
    confidence = scores.max(axis=1)
    chosen = np.flatnonzero(confidence >= score_threshold)
    chosen = chosen[np.argsort(-confidence[chosen], kind="stable")][:limit]
    boxes = xyxy(rows[chosen, :4])
    kept = nms(boxes, confidence[chosen], classes[chosen], nms_iou)
    return boxes[kept], classes[chosen][kept], confidence[chosen][kept]


def matched_count(reference, candidate, match_iou: float) -> int:
    """Candidate detections matched one-to-one to reference ones of the same class at
    IoU >= ``match_iou``, the most confident candidates first."""
    ref_boxes, ref_classes, _ = reference
    cand_boxes, cand_classes, cand_conf = candidate
    free = np.ones(len(ref_boxes), dtype=bool)
    matched = 0
    for index in np.argsort(-cand_conf, kind="stable"):
        options = np.flatnonzero(free & (ref_classes == cand_classes[index]))
        if options.size == 0:
            continue
        ious = iou_one_to_many(cand_boxes[index], ref_boxes[options])
        best = int(ious.argmax())
        if ious[best] >= match_iou:
            free[options[best]] = False
            matched += 1
    return matched


@register(
    "detection",
    "YOLO-style boxes + class scores decoded, NMS, then 1 - min(recall, precision) of the "
    "candidate's detections against the reference's at IoU 0.5",
    options={
        "layout": "auto",
        "score_threshold": 0.25,
        "nms_iou": 0.45,
        "match_iou": 0.5,
        "objectness": 0,
        "max_candidates": 1000,
        "classes": 0,
    },
    threshold=0.05,
)
def detection(reference, candidate, ctx: MetricContext):
    options = ctx.options
    if options["layout"] not in LAYOUTS:
        raise PackagerError(
            f"output {ctx.output!r}: detection layout must be one of {', '.join(LAYOUTS)}"
        )
    layout = detection_layout(tuple(reference.shape), options["layout"])
    if layout is None:
        raise PackagerError(
            f"output {ctx.output!r} has shape {list(reference.shape)}; detection needs "
            "[samples, 4 + classes, anchors] or [samples, anchors, 4 + classes] "
            "(layout=channels-first|channels-last when the axes are ambiguous)"
        )
    if layout == "channels-first":
        reference, candidate = reference.transpose(0, 2, 1), candidate.transpose(0, 2, 1)
    settings = (
        options["score_threshold"],
        options["nms_iou"],
        bool(options["objectness"]),
        options["max_candidates"],
        options["classes"],
    )
    found_ref = found_cand = matched = 0
    for ref_rows, cand_rows in zip(reference, candidate, strict=True):
        ref = decode(ref_rows, *settings)
        cand = decode(cand_rows, *settings)
        found_ref += len(ref[0])
        found_cand += len(cand[0])
        matched += matched_count(ref, cand, options["match_iou"])
    if found_ref == 0:  # nothing to keep: any candidate would "pass", which proves nothing
        raise PackagerError(
            f"output {ctx.output!r}: the float model finds no detection on the eval data at "
            f"score_threshold {options['score_threshold']}, so the detection metric cannot "
            "judge the candidate; use eval images with objects in them, or lower it: "
            f"--metric {ctx.output}=detection:score_threshold=V"
        )
    recall = matched / found_ref
    precision = matched / found_cand if found_cand else 1.0
    f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
    return 1.0 - min(recall, precision), {
        "reference_detections": float(found_ref),
        "candidate_detections": float(found_cand),
        "matched": float(matched),
        "recall": recall,
        "precision": precision,
        "f1": f1,
    }
