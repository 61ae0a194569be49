import numpy as np
import pytest

from packager.errors import PackagerError
from packager.passes.evaluate import Evaluate


def evaluate(reference, candidate, labels=None, data=None, **config):
    gate = Evaluate({"max_degradation": 0.01, **config})
    from packager.metrics import combine

    rows, summary = gate.score(reference, candidate, data or {}, labels)
    return combine(rows, [summary])


def test_identical_outputs_have_no_degradation():
    reference = {"y": np.array([[1.0, 2.0, 0.5, 4.0, 1.0], [3.0, -1.0, 2.0, 0.0, 1.0]])}

    figures = evaluate(reference, reference)

    assert figures["cosine_mean"] == pytest.approx(1.0)
    assert figures["max_abs_error"] == 0.0
    assert figures["degradation"] == pytest.approx(0.0, abs=1e-6)
    assert figures["passed"] is True
    assert figures["outputs"][0]["metric"] == "cosine"


def test_a_classifier_with_labels_is_judged_on_top1_and_keeps_its_accuracy_figures():
    reference = {"logits": np.array([[5.0, 1.0], [1.0, 5.0], [5.0, 1.0], [1.0, 5.0]])}
    candidate = {"logits": np.array([[5.0, 1.0], [1.0, 5.0], [1.0, 5.0], [1.0, 5.0]])}

    figures = evaluate(reference, candidate, labels=np.array([0, 1, 0, 0]))

    assert figures["top1_agreement"] == 0.75
    assert figures["accuracy_drop"] == 0.25
    assert figures["degradation"] == 0.25
    assert figures["passed"] is False
    assert figures["outputs"][0] | {"figures": None} == {
        "output": "logits",
        "metric": "top1",
        "degradation": 0.25,
        "threshold": 0.01,
        "passed": False,
        "eval_file": None,
        "figures": None,
    }


def test_each_output_is_scored_and_the_worst_decides():
    reference = {"speech": np.array([[0.1], [0.9], [0.2]]), "state": np.ones((3, 8))}
    candidate = {"speech": np.array([[0.1], [0.1], [0.2]]), "state": np.ones((3, 8))}

    figures = evaluate(reference, candidate)

    assert [(r["output"], r["metric"], r["passed"]) for r in figures["outputs"]] == [
        ("speech", "relative-error", False),
        ("state", "cosine", True),
    ]
    assert figures["cosine_mean"] > 0.99  # what the old whole-tensor gate saw
    assert figures["degradation"] > 0.9


def test_a_metric_plugin_judges_the_whole_model():
    reference = {"logits": np.array([[5.0, 1.0], [1.0, 5.0]])}
    candidate = {"logits": np.array([[5.0, 1.0], [5.0, 1.0]])}

    figures = evaluate(
        reference,
        candidate,
        data={"x": np.zeros((2, 3))},
        metric_plugin="tests.packager.metric_plugin:decision_agreement",
    )

    assert figures["outputs"] == [
        {
            "output": "*",
            "metric": "plugin tests.packager.metric_plugin:decision_agreement",
            "degradation": 0.5,
            "threshold": 0.01,
            "passed": False,
            "eval_file": None,
            "figures": {"agreement": 0.5},
        }
    ]


def test_a_task_that_fits_no_output_says_so():
    with pytest.raises(PackagerError, match="--task detection: no output looks like"):
        evaluate({"y": np.ones((2, 3))}, {"y": np.ones((2, 3))}, task="detection")
