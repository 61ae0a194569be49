"""Task-level checks, written apart from the gate: what a user of each model looks at.

Each function takes the float model's outputs and a candidate's (dicts of arrays, samples
stacked on the first axis unless said otherwise) and returns plain figures. numpy only, so
the checks cannot share a bug with the packager's metrics.
"""

from __future__ import annotations

import numpy as np


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one [x1, y1, x2, y2] box with each row of ``boxes``."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Indices kept by greedy non-maximum suppression, best score first."""
    order = list(np.argsort(-scores, kind="stable"))
    kept: list[int] = []
    while order:
        best = order.pop(0)
        kept.append(int(best))
        if order:
            rest = np.array(order)
            order = list(rest[box_iou(boxes[best], boxes[rest]) < iou_threshold])
    return kept


Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes [K, 4], scores [K], classes [K]


def decode_yolo(
    output: np.ndarray, score_threshold: float = 0.25, iou_threshold: float = 0.45
) -> Detections:
    """One image's YOLOv8 output [4 + classes, anchors] -> detections after per-class NMS.

    Rows 0-3 are the box centre and size in input pixels, the rest class scores in [0, 1].
    """
    centre_size, class_scores = output[:4].T, output[4:].T
    classes = class_scores.argmax(axis=1)
    scores = class_scores.max(axis=1)
    keep = scores >= score_threshold
    centre_size, classes, scores = centre_size[keep], classes[keep], scores[keep]
    boxes = np.concatenate(
        [centre_size[:, :2] - centre_size[:, 2:] / 2, centre_size[:, :2] + centre_size[:, 2:] / 2],
        axis=1,
    )
    kept: list[int] = []
    for label in np.unique(classes):
        members = np.flatnonzero(classes == label)
        kept += [int(members[i]) for i in nms(boxes[members], scores[members], iou_threshold)]
    kept.sort(key=lambda i: -scores[i])
    return boxes[kept], scores[kept], classes[kept]


def detection_recall(
    reference: list[Detections], candidate: list[Detections], iou: float = 0.5
) -> tuple[float, int]:
    """Share of the reference's detections that the candidate also finds (same class, IoU
    >= ``iou``, each candidate box used once), and the reference's detection count."""
    found = total = 0
    for (ref_boxes, _, ref_classes), (cand_boxes, _, cand_classes) in zip(
        reference, candidate, strict=True
    ):
        free = np.ones(len(cand_boxes), dtype=bool)
        for box, label in zip(ref_boxes, ref_classes, strict=True):
            total += 1
            usable = free & (cand_classes == label)
            if not usable.any():
                continue
            overlaps = np.where(usable, box_iou(box, cand_boxes), 0.0)
            best = int(overlaps.argmax())
            if overlaps[best] >= iou:
                free[best] = False
                found += 1
    return (found / total if total else 1.0), total


def decode_blazeface(
    regressors: np.ndarray,
    classificators: np.ndarray,
    anchors: np.ndarray,
    input_size: int,
    score_threshold: float = 0.5,
    iou_threshold: float = 0.3,
) -> Detections:
    """One image's BlazeFace outputs ([896, 16], [896, 1]) -> face boxes (normalised
    [x1, y1, x2, y2]) after NMS, as MediaPipe's short-range detector decodes them."""
    raw = regressors.reshape(-1, 8, 2) / input_size
    centre = raw[:, 0] + anchors
    size = raw[:, 1]
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    scores = 1 / (1 + np.exp(-np.clip(classificators.reshape(-1), -80, 80)))
    keep = (scores > score_threshold) & np.all(size > 0, axis=1)
    boxes, scores = boxes[keep], scores[keep]
    kept = nms(boxes, scores, iou_threshold)
    return boxes[kept], scores[kept], np.zeros(len(kept), dtype=np.int64)


def blazeface_anchors(input_size: int = 128, strides=(8, 16, 16, 16)) -> np.ndarray:
    """The short-range model's 896 anchor centres (MediaPipe's SsdAnchorsCalculator with
    interpolated_scale_aspect_ratio 1.0: two anchors per cell, fixed size)."""
    centres: list[tuple[float, float]] = []
    layer = 0
    while layer < len(strides):
        same = 0
        while layer + same < len(strides) and strides[layer + same] == strides[layer]:
            same += 1
        cells = int(np.ceil(input_size / strides[layer]))
        for y in range(cells):
            for x in range(cells):
                centres += [((x + 0.5) / cells, (y + 0.5) / cells)] * (2 * same)
        layer += same
    return np.array(centres, dtype=np.float32)


def ctc_greedy(logits: np.ndarray, characters: list[str]) -> list[str]:
    """PaddleOCR's CTC decoding: argmax per step, repeats merged, blank (index 0) dropped.

    ``characters`` is the model's dictionary with blank first and space last, as
    rapidocr builds it from the model's ``character`` metadata.
    """
    texts = []
    for steps in logits.argmax(axis=-1):
        keep = np.ones(len(steps), dtype=bool)
        keep[1:] = steps[1:] != steps[:-1]
        keep &= steps != 0
        texts.append("".join(characters[i] for i in steps[keep]))
    return texts


def map_iou(reference: np.ndarray, candidate: np.ndarray, threshold: float = 0.3) -> float:
    """IoU of the two probability maps thresholded at ``threshold`` (over all samples)."""
    ref, cand = reference > threshold, candidate > threshold
    union = np.logical_or(ref, cand).sum()
    return float(np.logical_and(ref, cand).sum() / union) if union else 1.0


def token_cosines(reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Cosine of each real token's vector ([batch, seq, dim] outputs, mask [batch, seq])."""
    real = mask.astype(bool)
    ref, cand = reference[real].astype(np.float64), candidate[real].astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    return (ref * cand).sum(axis=1) / np.maximum(norms, 1e-12)
