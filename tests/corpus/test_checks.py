"""The corpus's own task checks on hand-made arrays: they must catch what they claim to."""

from __future__ import annotations

import numpy as np
import pytest

from tests.corpus import checks


def yolo_output(boxes: list[tuple[float, float, float, float, int, float]], classes: int = 3):
    """[4 + classes, anchors] with one anchor per (cx, cy, w, h, class, score), plus one
    empty anchor."""
    output = np.zeros((4 + classes, len(boxes) + 1), dtype=np.float32)
    for anchor, (cx, cy, w, h, label, score) in enumerate(boxes):
        output[:4, anchor] = (cx, cy, w, h)
        output[4 + label, anchor] = score
    return output


def test_decode_yolo_suppresses_overlaps_within_a_class_only():
    output = yolo_output(
        [(50, 50, 20, 20, 0, 0.9), (52, 50, 20, 20, 0, 0.8), (52, 50, 20, 20, 1, 0.7)]
    )
    boxes, scores, classes = checks.decode_yolo(output)
    assert sorted(classes.tolist()) == [0, 1]
    assert scores.tolist() == pytest.approx([0.9, 0.7])
    assert boxes[0].tolist() == pytest.approx([40, 40, 60, 60])


def test_detection_recall_counts_lost_and_moved_boxes():
    reference = checks.decode_yolo(
        yolo_output([(50, 50, 20, 20, 0, 0.9), (150, 50, 20, 20, 1, 0.9)])
    )
    moved = checks.decode_yolo(yolo_output([(50, 50, 20, 20, 0, 0.9), (170, 50, 20, 20, 1, 0.9)]))
    weak = checks.decode_yolo(yolo_output([(50, 50, 20, 20, 0, 0.9), (150, 50, 20, 20, 1, 0.1)]))

    assert checks.detection_recall([reference], [reference]) == (1.0, 2)
    assert checks.detection_recall([reference], [moved]) == (0.5, 2)
    assert checks.detection_recall([reference], [weak]) == (0.5, 2)


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    characters = ["blank", "a", "b", " "]
    steps = [1, 1, 0, 1, 2, 2, 3, 0]
    logits = np.eye(4, dtype=np.float32)[steps][None]
    assert checks.ctc_greedy(logits, characters) == ["aab "]


def test_blazeface_anchors_match_the_short_range_model():
    anchors = checks.blazeface_anchors()
    assert anchors.shape == (896, 2)
    assert anchors[0].tolist() == pytest.approx([0.5 / 16, 0.5 / 16])
    assert anchors[-1].tolist() == pytest.approx([7.5 / 8, 7.5 / 8])


def test_map_iou_and_token_cosines():
    reference = np.zeros((1, 1, 4, 4), dtype=np.float32)
    reference[..., :2, :] = 0.9
    half = reference.copy()
    half[..., 1, :] = 0.1
    assert checks.map_iou(reference, reference) == 1.0
    assert checks.map_iou(reference, half) == 0.5

    states = np.ones((1, 3, 2), dtype=np.float32)
    flipped = states.copy()
    flipped[0, 2] = -1  # a padding position: must not count
    mask = np.array([[1, 1, 0]])
    assert checks.token_cosines(states, flipped, mask).tolist() == pytest.approx([1.0, 1.0])
