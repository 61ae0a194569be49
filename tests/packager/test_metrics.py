"""The gate metrics on crafted arrays whose right answer is known (packager.metrics)."""

import numpy as np
import pytest

from packager.errors import PackagerError
from packager.metrics import (
    MetricContext,
    MetricSpec,
    auto_metric,
    check_names,
    combine,
    get_metric,
    parse_overrides,
    plan_outputs,
    score_dataset,
    summary_figures,
)
from packager.metrics.choose import OutputPlan
from packager.metrics.detection import nms
from packager.metrics.values import GROUP_RATIO, channel_groups, channel_scales, cosine_rows

RNG = np.random.default_rng(12)


def score(name, reference, candidate, data=None, labels=None, **options):
    metric = get_metric(name)
    context = MetricContext(
        output="y",
        data=data or {},
        labels=labels,
        options={**metric.options, **options},
        given=frozenset(options),
    )
    return metric.score(np.asarray(reference), np.asarray(candidate), context)


def whole_tensor_degradation(reference, candidate) -> float:
    """What the gate used to take: 1 - mean cosine over each sample's values."""
    return 1.0 - float(cosine_rows(candidate, reference).mean())


def int8_with_one_scale(values: np.ndarray) -> np.ndarray:
    """One symmetric int8 scale for the whole tensor, as a quantized Concat gets."""
    scale = np.abs(values).max() / 127
    return np.round(values / scale) * scale


def yolo_output(samples=4, classes=3, anchors=240, objects=6) -> np.ndarray:
    """A YOLOv8-like [samples, 4 + classes, anchors] output: boxes in pixels (0..320),
    class scores 0..1, with ``objects`` confident, well-separated objects per sample,
    each seen by two overlapping anchors (NMS keeps one)."""
    out = np.zeros((samples, 4 + classes, anchors), dtype=np.float32)
    out[:, 0:2] = RNG.uniform(20, 300, (samples, 2, anchors))
    out[:, 2:4] = RNG.uniform(8, 40, (samples, 2, anchors))
    out[:, 4:] = RNG.uniform(0.0, 0.05, (samples, classes, anchors))
    for sample in range(samples):
        for index in range(objects):
            anchor = 2 * index
            centre = (40.0 + 45 * index, 40.0 + 40 * index)
            for a in (anchor, anchor + 1):
                out[sample, 0:2, a] = centre
                out[sample, 2:4, a] = (30.0, 30.0)
                out[sample, 4 + index % classes, a] = 0.9 if a == anchor else 0.7
            out[sample, 0, anchor + 1] += 2.0  # overlapping duplicate
    return out


# --- cosine family ---------------------------------------------------------------------


def test_cosine_of_identical_and_orthogonal_outputs():
    reference = np.array([[1.0, 0.0], [0.0, 2.0]])

    assert score("cosine", reference, reference)[0] == pytest.approx(0.0)
    assert score("cosine", reference, reference[:, ::-1])[0] == pytest.approx(1.0)


def test_a_row_crushed_to_zero_is_nothing_like_its_reference():
    reference = np.array([[0.0, 0.0], [0.3, 0.1]])

    assert cosine_rows(np.zeros((2, 2)), reference).tolist() == [1.0, 0.0]


def test_one_value_per_sample_off_by_0_9_fails_relative_error_though_its_cosine_is_perfect():
    reference = RNG.uniform(0, 1, (50, 1)).astype(np.float32)
    reference[1], reference[3] = 0.0, 1.0  # a speech probability: range 1
    candidate = reference.copy()
    candidate[::2] = np.clip(reference[::2] + 0.9, None, 1.9)

    degradation, figures = score("relative-error", reference, candidate)

    assert whole_tensor_degradation(reference, candidate) == pytest.approx(0.0)
    assert degradation == pytest.approx(0.9, abs=1e-6)
    assert figures["max_abs_error"] == pytest.approx(0.9, abs=1e-6)
    assert figures["reference_range"] == pytest.approx(1.0)
    assert auto_metric("prob", reference, {}, None) == "relative-error"
    assert auto_metric("per_step", np.ones((4, 30, 1)), {}, None) == "relative-error"


def test_relative_error_ignores_one_outlier_in_a_thousand_unless_asked_for_the_max():
    reference = np.linspace(0, 1, 1000).reshape(1000, 1)
    candidate = reference + 0.001
    candidate[500] += 0.5

    robust, _ = score("relative-error", reference, candidate)
    worst, _ = score("relative-error", reference, candidate, quantile=1.0)

    assert robust == pytest.approx(0.001, abs=1e-6)
    assert worst == pytest.approx(0.501, abs=1e-6)


def tokens_with_padding():
    reference = RNG.normal(size=(6, 10, 16)).astype(np.float32)
    mask = np.zeros((6, 10), dtype=np.int64)
    for sample, length in enumerate((3, 4, 5, 6, 7, 10)):
        mask[sample, :length] = 1
    candidate = reference + RNG.normal(scale=0.01, size=reference.shape).astype(np.float32)
    candidate[mask == 0] = RNG.normal(size=(int((mask == 0).sum()), 16))  # padding: noise
    return reference, candidate, {"input_ids": mask * 7, "attention_mask": mask}


def test_cosine_tokens_judges_real_tokens_only():
    reference, candidate, data = tokens_with_padding()

    degradation, figures = score("cosine-tokens", reference, candidate, data)

    assert whole_tensor_degradation(reference, candidate) > 0.2
    assert degradation < 0.001
    assert figures["tokens"] == 35 and figures["masked"] == 1
    assert auto_metric("last_hidden_state", reference, data, None) == "cosine-tokens"


def test_cosine_tokens_takes_a_declared_mask_and_checks_its_shape():
    reference, candidate, data = tokens_with_padding()
    data = {"valid": data["attention_mask"], "ids": data["input_ids"]}

    degradation, _ = score("cosine-tokens", reference, candidate, data, mask="valid")
    assert degradation < 0.001
    with pytest.raises(PackagerError, match=r"mask input 'ids' has \[6, 9\].*\[6, 10\]"):
        score("cosine-tokens", reference, candidate, {"ids": data["ids"][:, :9]}, mask="ids")
    with pytest.raises(PackagerError, match="mask input 'nope' is not an eval input"):
        score("cosine-tokens", reference, candidate, data, mask="nope")


def test_cosine_pooled_averages_real_tokens_before_the_cosine():
    reference, candidate, data = tokens_with_padding()

    masked, _ = score("cosine-pooled", reference, candidate, data)
    unmasked, figures = score("cosine-pooled", reference, candidate, {})

    assert masked < 0.001
    assert unmasked > 0.05 and figures["masked"] == 0


def test_token_metrics_refuse_a_2d_output():
    with pytest.raises(PackagerError, match="cosine-tokens needs \\[samples, tokens, features\\]"):
        score("cosine-tokens", np.ones((2, 3)), np.ones((2, 3)))


# --- decisions -------------------------------------------------------------------------


def test_top1_counts_agreement_and_the_accuracy_drop_with_labels():
    reference = np.array([[5.0, 1.0], [1.0, 5.0], [5.0, 1.0], [1.0, 5.0]])
    candidate = np.array([[5.0, 1.0], [1.0, 5.0], [1.0, 5.0], [1.0, 5.0]])

    degradation, figures = score("top1", reference, candidate, labels=np.array([0, 1, 0, 0]))

    assert degradation == 0.25
    assert figures == {
        "top1_agreement": 0.75,
        "accuracy": 0.5,
        "reference_accuracy": 0.75,
        "accuracy_drop": 0.25,
    }
    assert auto_metric("logits", reference, {}, np.array([0, 1, 0, 0])) == "top1"
    embedding = RNG.normal(size=(4, 16))  # beside the logits: not graded by the labels
    assert auto_metric("embedding", embedding, {}, np.array([9, 9, 9, 9])) == "cosine"


def test_top1_on_a_declared_axis():
    reference = RNG.normal(size=(5, 4, 3))
    candidate = reference.copy()
    candidate[0, :, 0] = 100.0  # sample 0's first column now wins on axis 1

    on_axis_1, _ = score("top1", reference, candidate, axis=1)
    assert on_axis_1 == pytest.approx(1 / 15)
    with pytest.raises(PackagerError, match="one value on axis 1"):
        score("top1", np.ones((3, 1)), np.ones((3, 1)))
    with pytest.raises(PackagerError, match="needs a class axis other than the samples'"):
        score("top1", reference, candidate, axis=3)


def test_sequence_reads_ctc_paths_collapsed_and_other_sequences_step_by_step():
    classes = np.eye(4)
    paths = np.array([[1, 1, 0, 2, 0, 0], [3, 0, 0, 3, 0, 0], [2, 2, 2, 0, 0, 0]])
    reference = classes[paths]
    changed = paths.copy()
    changed[0, 1] = 0  # "1 1 0 2" -> "1 0 0 2": the same CTC reading (blank 0)
    changed[1, 3] = 2  # "3 0 0 3" -> "3 0 0 2": another reading
    candidate = classes[changed]

    ctc, figures = score("sequence", reference, candidate)  # blank 0 found: 10 of 18 steps
    steps, raw = score("sequence", reference, candidate, blank="none")

    assert figures["blank"] == 0.0
    assert figures["step_agreement"] == pytest.approx(16 / 18)
    assert ctc == pytest.approx(1 / 3) and figures["sequence_agreement"] == pytest.approx(2 / 3)
    assert steps == pytest.approx(2 / 18) and raw["sequence_agreement"] == pytest.approx(1 / 3)
    assert get_metric("sequence").threshold == 0.05
    with pytest.raises(PackagerError, match="blank='x' must be auto, none or a class number"):
        score("sequence", reference, candidate, blank="x")


def test_a_tagger_without_a_dominant_class_is_judged_per_step():
    paths = np.array([[1, 2, 3, 1], [2, 2, 1, 3]])
    reference = np.eye(4)[paths]
    candidate = reference.copy()
    candidate[0, 0] = np.eye(4)[2]

    degradation, figures = score("sequence", reference, candidate)

    assert figures["blank"] == -1.0
    assert degradation == pytest.approx(1 / 8)


def test_dense_is_one_minus_the_iou_of_the_thresholded_maps():
    reference = np.zeros((2, 1, 8, 8))
    reference[:, :, 2:6, 2:6] = 0.9  # 16 pixels a sample
    candidate = reference.copy()
    candidate[:, :, 2:6, 5] = 0.1  # 4 of them lost

    degradation, figures = score("dense", reference, candidate)

    assert figures["iou"] == pytest.approx(12 / 16)
    assert degradation == pytest.approx(0.25)
    assert get_metric("dense").threshold == 0.1


def test_dense_asks_for_a_threshold_on_a_map_that_is_not_probabilities():
    logits = RNG.normal(size=(2, 8, 8))
    with pytest.raises(PackagerError, match="not a probability map.*y=dense:threshold=0"):
        score("dense", logits, logits)

    degradation, figures = score("dense", logits, logits, threshold=0.0)
    assert degradation == 0.0 and figures["threshold"] == 0.0


def test_integer_outputs_are_compared_exactly():
    reference = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int64)
    candidate = np.array([[1, 2], [3, 5], [5, 6]], dtype=np.int64)

    degradation, figures = score("exact", reference, candidate)

    assert degradation == pytest.approx(1 / 3)
    assert figures["element_agreement"] == pytest.approx(5 / 6)
    assert auto_metric("ids", reference, {}, None) == "exact"


# --- outputs that mix quantities -------------------------------------------------------


def test_channel_groups_are_found_where_magnitudes_jump():
    reference = yolo_output()

    groups = channel_groups(channel_scales(reference, 1), GROUP_RATIO)

    assert [list(group) for group in groups] == [[0, 1, 2, 3], [4, 5, 6]]
    assert channel_groups(np.array([1.0, 0.5, 0.2, 0.0]), GROUP_RATIO)[0].tolist() == [0, 1, 2, 3]
    assert auto_metric("output0", reference, {}, None) == "channel-groups"
    assert auto_metric("features", RNG.normal(size=(4, 32)), {}, None) == "cosine"


def test_a_probability_map_is_not_taken_for_concatenated_quantities():
    """The rows of a text map are large where a sample has text: that varies by sample,
    so the gaps between its rows' magnitudes are not channel groups."""
    maps = np.full((6, 1, 32, 32), 0.001)
    for sample in range(6):
        maps[sample, 0, 4 * sample : 4 * sample + 3, 4 * sample : 4 * sample + 9] = 0.95

    assert channel_groups(channel_scales(maps, 2), GROUP_RATIO)[0].size < 32  # a gap...
    assert auto_metric("maps", maps, {}, None) == "cosine"  # ...but not a consistent one


def test_crushed_scores_fail_channel_groups_and_detection_though_the_whole_cosine_is_1():
    reference = yolo_output()
    crushed = int8_with_one_scale(reference)

    groups, group_figures = score("channel-groups", reference, crushed)
    detection, figures = score("detection", reference, crushed)

    assert whole_tensor_degradation(reference, crushed) < 0.001
    assert group_figures["groups"] == 2 and group_figures["group1_first_channel"] == 4
    assert groups > 0.5
    assert figures["reference_detections"] == 4 * 6
    assert figures["candidate_detections"] == 0
    assert detection == 1.0


def test_channel_groups_can_be_declared():
    reference = yolo_output()
    crushed = int8_with_one_scale(reference)

    degradation, figures = score("channel-groups", reference, crushed, split="4;5")

    assert figures["groups"] == 3
    assert [figures[f"group{i}_channels"] for i in range(3)] == [4, 1, 2]
    assert degradation > 0.5
    with pytest.raises(PackagerError, match="split='9' must list channels between 1 and 6"):
        score("channel-groups", reference, crushed, split="9")


def test_detection_keeps_a_faithful_candidate_in_either_layout():
    reference = yolo_output()
    candidate = reference + RNG.normal(scale=0.004, size=reference.shape).astype(np.float32)

    first, figures = score("detection", reference, candidate)
    last, _ = score("detection", reference.transpose(0, 2, 1), candidate.transpose(0, 2, 1))

    assert first == last == 0.0
    assert figures["recall"] == figures["precision"] == 1.0
    assert figures["reference_detections"] == 24  # the duplicates were suppressed


def test_detection_counts_lost_and_invented_detections():
    reference = yolo_output(samples=1, objects=4)
    lost = reference.copy()
    lost[0, 4:, 0] = 0.0  # object 0 gone from its best anchor...
    lost[0, 4:, 1] = 0.0  # ...and from its duplicate
    invented = reference.copy()
    invented[0, 0:4, 100] = (300.0, 300.0, 20.0, 20.0)
    invented[0, 5, 100] = 0.8

    _, recall = score("detection", reference, lost)
    _, precision = score("detection", reference, invented)

    assert recall["recall"] == 0.75 and recall["precision"] == 1.0
    assert precision["precision"] == 0.8 and precision["recall"] == 1.0
    with pytest.raises(PackagerError, match="detection needs"):
        score("detection", np.ones((2, 3)), np.ones((2, 3)))


def test_detection_refuses_to_judge_when_the_reference_finds_nothing():
    quiet = yolo_output(objects=0)

    with pytest.raises(PackagerError, match="finds no detection on the eval data at "):
        score("detection", quiet, quiet)
    assert score("detection", quiet, quiet, score_threshold=0.01)[0] == 0.0


def test_detection_counts_only_the_declared_classes_of_a_segmentation_head():
    reference = yolo_output()
    coefficients = RNG.normal(scale=3.0, size=(4, 5, reference.shape[2])).astype(np.float32)
    with_masks = np.concatenate([reference, coefficients], axis=1)  # 4 + 3 classes + 5
    candidate = with_masks.copy()
    candidate[:, 7:] = -candidate[:, 7:]  # the mask coefficients change; the boxes do not

    degradation, figures = score("detection", with_masks, candidate, classes=3)

    assert degradation == 0.0 and figures["reference_detections"] == 24


def test_nms_suppresses_overlaps_within_a_class_only():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    classes = np.array([0, 0, 1, 0])

    assert nms(boxes, scores, classes, 0.45).tolist() == [0, 2, 3]


# --- choosing, thresholds, the verdict -------------------------------------------------


def test_tasks_claim_the_outputs_that_fit_and_leave_the_rest_to_auto():
    reference = {"boxes": yolo_output(), "speech": np.ones((4, 1))}
    kwargs = dict(overrides={}, plugin=False, max_degradation=0.01, threshold_given=False)

    plans = plan_outputs(reference, {}, None, task="detection", **kwargs)

    assert [(p.output, p.spec.name, p.threshold) for p in plans] == [
        ("boxes", "detection", 0.05),  # the metric's own default threshold
        ("speech", "relative-error", 0.01),
    ]
    given = plan_outputs(
        reference, {}, None, task="detection", **{**kwargs, "threshold_given": True}
    )
    assert given[0].threshold == 0.01  # an explicit --max-degradation wins
    with pytest.raises(PackagerError, match="--task classification: no output looks like class"):
        plan_outputs(reference, {}, None, task="classification", **kwargs)


def test_the_embedding_task_judges_token_outputs_per_real_token():
    reference = {"last_hidden_state": np.ones((2, 5, 8)), "pooled": np.ones((2, 8))}

    plans = plan_outputs(
        reference, {}, None, task="embedding", overrides={}, plugin=False,
        max_degradation=0.01, threshold_given=False,
    )  # fmt: skip

    assert [p.spec.name for p in plans] == ["cosine-tokens", "cosine"]


def test_metric_overrides_parse_with_options_and_their_own_threshold():
    overrides = parse_overrides({"speech": "relative-error:quantile=1,max=0.2"})
    reference = {"speech": np.ones((4, 1)), "state": np.ones((4, 8))}

    plans = plan_outputs(
        reference,
        {},
        None,
        task="generic",
        overrides=overrides,
        plugin=False,
        max_degradation=0.01,
        threshold_given=True,
    )

    assert plans[0] == OutputPlan(
        "speech", MetricSpec("relative-error", {"quantile": 1.0}, 0.2), 0.2
    )
    assert plans[0].spec.describe() == "relative-error:quantile=1.0,max=0.2"
    assert (plans[1].spec.name, plans[1].threshold) == ("cosine", 0.01)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cosinus", "unknown metric 'cosinus'; known metrics: channel-groups, cosine, "),
        ("dense:thresh=0.2", "metric 'dense' takes options max, threshold"),
        ("dense:threshold=high", "option threshold='high' must be a number"),
        ("top1:axis=1.5", "option axis='1.5' must be an integer"),
        ("top1:max=2", "max=2 must be between 0 and 1"),
    ],
)
def test_bad_metric_specs_are_refused(text, message):
    with pytest.raises(PackagerError, match=message):
        parse_overrides({"y": text})


def test_metric_names_must_be_outputs_of_the_model():
    overrides = parse_overrides({"scores": "top1", "hidden": "cosine-tokens:mask=am"})

    with pytest.raises(
        PackagerError, match="output 'scores', which the model does not have; its outputs: logits"
    ):
        check_names(overrides, ["logits", "hidden"], ["ids", "am"])
    with pytest.raises(
        PackagerError, match="mask input 'am' is not a model input; its inputs: ids"
    ):
        check_names({"hidden": overrides["hidden"]}, ["hidden"], ["ids"])


def test_a_nan_or_reshaped_candidate_is_fully_degraded():
    reference = {"y": np.ones((3, 4)), "z": np.ones((3, 2))}
    candidate = {"y": np.where(np.eye(3, 4) > 0, np.nan, 1.0), "z": np.ones((3, 3))}
    plans = [
        OutputPlan("y", MetricSpec("cosine"), 0.01),
        OutputPlan("z", MetricSpec("cosine"), 0.01),
    ]

    rows = score_dataset(plans, reference, candidate, {}, None)

    assert [(r["degradation"], r["figures"]) for r in rows] == [
        (1.0, {"nonfinite_values": 3.0}),
        (1.0, {"shape_mismatch": 1.0}),
    ]
    summary = summary_figures(reference, candidate)  # finite, for the manifest's JSON
    assert summary["max_abs_error"] == 1e30 and summary["cosine_min"] == 0.0


def test_a_metric_that_cannot_say_fails_the_output(monkeypatch):
    from packager.metrics import registry

    monkeypatch.setitem(
        registry.METRICS,
        "unsure",
        registry.Metric("unsure", lambda r, c, ctx: (float("nan"), {"x": float("inf")}), ""),
    )
    reference = {"y": np.ones((2, 3))}

    (row,) = score_dataset(
        [OutputPlan("y", MetricSpec("unsure"), 0.5)], reference, reference, {}, None
    )

    assert (row["degradation"], row["passed"], row["figures"]) == (1.0, False, {"x": 1e30})


def test_the_verdict_is_the_worst_output_over_every_dataset():
    reference = {"logits": np.array([[2.0, 1.0], [1.0, 2.0]]), "p": np.array([[0.0], [1.0]])}
    candidate = {"logits": reference["logits"].copy(), "p": np.array([[0.0], [0.5]])}
    plans = [
        OutputPlan("logits", MetricSpec("top1"), 0.01),
        OutputPlan("p", MetricSpec("relative-error", {"quantile": 1.0}), 0.6),
    ]
    first = score_dataset(plans, reference, reference, {}, None, eval_file="a.npz")
    second = score_dataset(plans, reference, candidate, {}, None, eval_file="b.npz")

    figures = combine(
        first + second,
        [summary_figures(reference, reference), summary_figures(reference, candidate)],
    )

    assert figures["passed"] is True  # 0.5 is within p's own limit of 0.6
    assert figures["degradation"] == 0.5
    assert figures["max_abs_error"] == 0.5  # the worse dataset's
    assert figures["top1_agreement"] == 1.0
    assert [row["eval_file"] for row in figures["outputs"]] == ["a.npz"] * 2 + ["b.npz"] * 2
