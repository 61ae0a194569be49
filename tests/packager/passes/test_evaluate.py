import numpy as np
import pytest

from packager.passes.evaluate import compare, degradation


def test_identical_outputs_have_no_degradation():
    reference = {"y": np.array([[1.0, 2.0], [3.0, -1.0]], dtype=np.float32)}

    metrics = compare(reference, reference, None, classification=False)

    assert metrics["cosine_mean"] == pytest.approx(1.0)
    assert metrics["max_abs_error"] == 0.0
    assert degradation(metrics) == pytest.approx(0.0, abs=1e-6)


def test_classifier_figures_count_top1_and_accuracy():
    reference = {"logits": np.array([[5.0, 1.0], [1.0, 5.0], [5.0, 1.0], [1.0, 5.0]])}
    candidate = {"logits": np.array([[5.0, 1.0], [1.0, 5.0], [1.0, 5.0], [1.0, 5.0]])}
    labels = np.array([0, 1, 0, 0])

    metrics = compare(candidate, reference, labels, classification=True)

    assert metrics["top1_agreement"] == 0.75
    assert metrics["reference_accuracy"] == 0.75
    assert metrics["accuracy"] == 0.5
    assert metrics["accuracy_drop"] == 0.25
    assert degradation(metrics) == 0.25


def test_orthogonal_outputs_are_fully_degraded():
    metrics = compare({"y": np.array([[0.0, 1.0]])}, {"y": np.array([[1.0, 0.0]])}, None, False)

    assert degradation(metrics) == pytest.approx(1.0)
