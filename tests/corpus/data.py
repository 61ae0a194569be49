"""Calibration and evaluation data for the corpus, built at test time from real material.

- photos: scikit-image's bundled test photos (an astronaut, a cameraman, a cat, coffee,
  a rocket) and its subset of Labeled Faces in the Wild (100 people); cropped, resized,
  flipped, pasted into scenes;
- text images: sentences from packager/examples/sentences.txt rendered with Pillow's
  bundled font;
- audio: speech-like signals (voiced syllables through formant filters, fricative noise)
  with silent gaps: no PyPI wheel in the environment ships recorded speech.

Everything is seeded, so a rerun gives the same arrays.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

SENTENCES = Path(__file__).resolve().parents[2] / "packager" / "examples" / "sentences.txt"


def sentences() -> list[str]:
    text = SENTENCES.read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


# -- photos -------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def photos() -> tuple[np.ndarray, ...]:
    """scikit-image's bundled photos as RGB uint8 [H, W, 3]: the cameraman, the astronaut,
    coffee, a cat, a rocket."""
    from skimage import data

    gray = np.stack([data.camera()] * 3, axis=-1)
    return (gray, data.astronaut(), data.coffee(), data.chelsea(), data.rocket())


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    resized = Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized)


def letterbox(image: np.ndarray, size: int, fill: int = 114) -> np.ndarray:
    """``image`` scaled to fit a ``size`` square, centred on a grey canvas (YOLO style)."""
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    canvas = np.full((size, size, 3), fill, dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resize(image, new_w, new_h)
    return canvas


def photo_view(image: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """``image`` letterboxed to ``size``; with ``rng``, first a random square crop (50-100%
    of the short side), maybe mirrored, brighter or darker."""
    if rng is not None:
        height, width = image.shape[:2]
        side = int(min(height, width) * rng.uniform(0.5, 1.0))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        image = _jitter(image[top : top + side, left : left + side], rng)
    return letterbox(np.ascontiguousarray(image), size)


def random_views(count: int, size: int, seed: int) -> list[np.ndarray]:
    """``count`` square views of the photos in turn: each photo whole first, then random
    crops (see ``photo_view``)."""
    rng = np.random.default_rng(seed)
    return [
        photo_view(photos()[i % len(photos())], size, rng if i >= len(photos()) else None)
        for i in range(count)
    ]


ASTRONAUT_FACE = (176, 60, 274, 165)  # x1, y1, x2, y2 of the face in data.astronaut()


@lru_cache(maxsize=1)
def lfw_faces() -> np.ndarray:
    """The 100 face crops of scikit-image's LFW subset (Labeled Faces in the Wild: 100
    people, 25x25 grey, tightly cropped), as RGB uint8 [100, 25, 25, 3]."""
    from skimage import data

    faces = (data.lfw_subset()[:100] * 255).round().astype(np.uint8)
    return np.repeat(faces[..., None], 3, axis=-1)


def _jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return np.clip(image * rng.uniform(0.75, 1.2), 0, 255).astype(np.uint8)


def _astronaut_face(rng: np.random.Generator, context: float) -> np.ndarray:
    """A square crop around the astronaut's face: the box grown by ``context`` times a
    random factor and shifted a little."""
    from skimage import data

    x1, y1, x2, y2 = ASTRONAUT_FACE
    cx = (x1 + x2) / 2 + rng.uniform(-0.08, 0.08) * (x2 - x1)
    cy = (y1 + y2) / 2 + rng.uniform(-0.08, 0.08) * (y2 - y1)
    half = max(x2 - x1, y2 - y1) * context * rng.uniform(0.85, 1.15) / 2
    padded = np.pad(data.astronaut(), ((512, 512), (512, 512), (0, 0)), mode="edge")
    top, left = int(cy - half) + 512, int(cx - half) + 512
    return padded[top : top + int(2 * half), left : left + int(2 * half)]


def face_crops(count: int, size: int, seed: int, people: range) -> list[np.ndarray]:
    """``count`` face crops as a landmark model gets them from a detector, resized to
    ``size``: LFW faces of the ``people`` indices (upscaled from 25 px, as from a far
    camera), every fourth one the astronaut's face at full resolution."""
    rng = np.random.default_rng(seed)
    crops = []
    for index in range(count):
        if index % 4 == 3:
            crop = _astronaut_face(rng, context=1.5)
        else:
            crop = lfw_faces()[people[index % len(people)]]
        crops.append(resize(np.ascontiguousarray(_jitter(crop, rng)), size, size))
    return crops


def face_scenes(count: int, size: int, seed: int, people: range) -> list[np.ndarray]:
    """Square scenes for a face detector: an LFW face (25-55% of the frame) pasted on a
    photo, the astronaut's face with more of her around it, and every fourth scene one
    of the other photos, with no face in it."""
    rng = np.random.default_rng(seed)
    scenes = []
    for index in range(count):
        if index % 4 == 3:
            scenes.append(photo_view(photos()[int(rng.integers(len(photos())))], size, rng))
            continue
        if index % 4 == 2:
            face = _astronaut_face(rng, context=rng.uniform(2.0, 3.5))
            scenes.append(resize(np.ascontiguousarray(_jitter(face, rng)), size, size))
            continue
        scene = photo_view(photos()[int(rng.integers(len(photos())))], size, rng)
        side = int(size * rng.uniform(0.25, 0.55))
        face = resize(lfw_faces()[people[index % len(people)]], side, side)
        top, left = (int(rng.integers(0, size - side + 1)) for _ in range(2))
        scene[top : top + side, left : left + side] = _jitter(face, rng)
        scenes.append(scene)
    return scenes


# -- text images --------------------------------------------------------------------------


def font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def render_text(text: str, height: int, rng: np.random.Generator) -> np.ndarray:
    """One line of dark text on a light background, as RGB uint8 about ``height`` high."""
    from PIL import Image, ImageDraw

    face = font(int(height * 0.7))
    left, top, right, bottom = face.getbbox(text)
    margin = int(height * 0.15)
    width = right - left + 2 * margin
    background = tuple(int(v) for v in rng.integers(205, 256, size=3))
    ink = tuple(int(v) for v in rng.integers(0, 70, size=3))
    canvas = Image.new("RGB", (width, height), background)
    ImageDraw.Draw(canvas).text(
        (margin - left, (height - (bottom - top)) // 2 - top), text, font=face, fill=ink
    )
    return np.asarray(canvas)


def text_snippets(count: int, seed: int, max_words: int = 3) -> list[str]:
    """Runs of 1-``max_words`` consecutive words from the sentences, punctuation kept."""
    rng = np.random.default_rng(seed)
    all_sentences = sentences()
    snippets = []
    for _ in range(count):
        words = all_sentences[int(rng.integers(len(all_sentences)))].split()
        length = int(rng.integers(1, max_words + 1))
        start = int(rng.integers(0, max(1, len(words) - length + 1)))
        snippets.append(" ".join(words[start : start + length]))
    return snippets


def normalise_ocr(image: np.ndarray) -> np.ndarray:
    """PaddleOCR's input: CHW float32 in [-1, 1]."""
    return (image.astype(np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5


def ocr_line_tensor(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """A text line resized to ``height`` (aspect kept, at most ``width``) and right-padded
    with zeros, as rapidocr's recogniser and angle classifier prepare it."""
    h, w = image.shape[:2]
    new_w = min(width, int(np.ceil(height * w / h)))
    tensor = np.zeros((3, height, width), dtype=np.float32)
    tensor[:, :, :new_w] = normalise_ocr(resize(image, new_w, height))
    return tensor


def ocr_lines(
    count: int, seed: int, height: int = 48, width: int = 320
) -> tuple[np.ndarray, list[str]]:
    """``count`` rendered text lines as recogniser input [N, 3, height, width], and the
    texts. Lines render at 32-64 px and are resized to ``height``, as crops from a page."""
    rng = np.random.default_rng(seed)
    texts = text_snippets(count, seed)
    tensors = [
        ocr_line_tensor(render_text(text, int(rng.integers(32, 65)), rng), height, width)
        for text in texts
    ]
    return np.stack(tensors), texts


def ocr_angle_lines(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Text lines for the angle classifier [N, 3, 48, 192]; every other one turned by 180
    degrees. Labels: 0 = upright, 1 = upside down (the model's label_list ['0', '180'])."""
    rng = np.random.default_rng(seed)
    texts = text_snippets(count, seed + 1, max_words=2)
    tensors, labels = [], []
    for index, text in enumerate(texts):
        image = render_text(text, int(rng.integers(32, 65)), rng)
        flipped = index % 2 == 1
        if flipped:
            image = np.ascontiguousarray(image[::-1, ::-1])
        tensors.append(ocr_line_tensor(image, 48, 192))
        labels.append(int(flipped))
    return np.stack(tensors), np.array(labels, dtype=np.int64)


def text_pages(count: int, seed: int, size: int = 320) -> np.ndarray:
    """``count`` square pages [N, 3, size, size] for the text detector: 3-6 lines of text
    at random sizes and places, on paper or on a lightened photo."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pages = []
    for index in range(count):
        if index % 2:
            photo = random_views(1, size, seed + index)[0]
            page = (photo.astype(np.float32) * 0.35 + 255 * 0.65).astype(np.uint8)
        else:
            page = np.full((size, size, 3), rng.integers(215, 256), dtype=np.uint8)
        canvas = Image.fromarray(page)
        top = int(rng.integers(4, 24))
        for text in text_snippets(int(rng.integers(3, 7)), seed * 100 + index, max_words=4):
            line = Image.fromarray(render_text(text, int(rng.integers(22, 44)), rng))
            if top + line.height > size:
                break
            left = int(rng.integers(0, max(1, size - min(line.width, size - 8))))
            canvas.paste(line, (left, top))
            top += line.height + int(rng.integers(2, 16))
        pages.append(normalise_ocr(np.asarray(canvas)))
    return np.stack(pages)


# -- audio --------------------------------------------------------------------------------


def _resonate(signal: np.ndarray, frequency: float, bandwidth: float, rate: int) -> np.ndarray:
    from scipy.signal import lfilter

    radius = np.exp(-np.pi * bandwidth / rate)
    theta = 2 * np.pi * frequency / rate
    a = [1.0, -2 * radius * np.cos(theta), radius**2]
    return lfilter([1 - radius], a, signal)


# (F1, F2, F3) of a few vowels, Hz (Peterson and Barney, adult speakers)
VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (530, 1840, 2480), (300, 870, 2240),
          (640, 1190, 2390), (490, 1350, 1690))  # fmt: skip


def _syllable(rng: np.random.Generator, rate: int) -> np.ndarray:
    duration = rng.uniform(0.12, 0.28)
    n = int(duration * rate)
    t = np.arange(n) / rate
    f0 = rng.uniform(95, 230) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(2, 6) * t))
    f0 *= 1 + 0.01 * rng.standard_normal(n).cumsum() / np.sqrt(np.arange(1, n + 1))
    phase = np.cumsum(f0 / rate)
    source = (phase % 1.0) - 0.5  # sawtooth glottal source, rich in harmonics
    source += 0.02 * rng.standard_normal(n)
    voiced = sum(
        _resonate(source, formant * rng.uniform(0.9, 1.1), 80 + 40 * k, rate) * (0.5**k)
        for k, formant in enumerate(VOWELS[int(rng.integers(len(VOWELS)))])
    )
    envelope = np.sin(np.pi * np.arange(n) / n) ** 0.6
    out = voiced * envelope
    if rng.random() < 0.4:  # a fricative onset
        m = int(rng.uniform(0.04, 0.09) * rate)
        hiss = _resonate(rng.standard_normal(m), rng.uniform(3500, 6000), 1500, rate)
        out = np.concatenate([0.3 * hiss * np.hanning(m), out])
    return out


def speech_like(seconds: float, seed: int, rate: int = 16000) -> tuple[np.ndarray, np.ndarray]:
    """A mono float32 signal of utterances and silences, and a per-sample speech flag.

    Utterances are 3-8 syllables with short gaps; silences last 0.4-1.2 s and hold only
    faint noise. Peak level is 0.5, as a normalised recording.
    """
    rng = np.random.default_rng(seed)
    total = int(seconds * rate)
    signal = np.zeros(total)
    speech = np.zeros(total, dtype=bool)
    position = int(rng.uniform(0.2, 0.6) * rate)
    while position < total:
        utterance = []
        for _ in range(int(rng.integers(3, 9))):
            utterance += [_syllable(rng, rate), np.zeros(int(rng.uniform(0.01, 0.06) * rate))]
        chunk = np.concatenate(utterance)
        chunk = chunk / (np.abs(chunk).max() + 1e-9) * rng.uniform(0.25, 0.5)
        end = min(total, position + len(chunk))
        signal[position:end] = chunk[: end - position]
        speech[position:end] = True
        position = end + int(rng.uniform(0.4, 1.2) * rate)
    signal += 10 ** (-55 / 20) * rng.standard_normal(total)  # room noise, -55 dBFS
    return signal.astype(np.float32), speech


def people_scenes(count: int, size: int, seed: int, people: range) -> list[np.ndarray]:
    """Square scenes for a person detector: every other one a view of the photos (see
    ``random_views``), the rest a photo with 2-4 LFW faces (18-40% of the frame) pasted on
    it."""
    rng = np.random.default_rng(seed)
    views = random_views((count + 1) // 2, size, seed + 1)
    scenes = []
    for index in range(count):
        if index % 2 == 0:
            scenes.append(views[index // 2])
            continue
        scene = photo_view(photos()[int(rng.integers(len(photos())))], size, rng)
        for _ in range(int(rng.integers(2, 5))):
            side = int(size * rng.uniform(0.18, 0.4))
            person = people[int(rng.integers(len(people)))]
            face = _jitter(resize(lfw_faces()[person], side, side), rng)
            top, left = (int(rng.integers(0, size - side + 1)) for _ in range(2))
            scene[top : top + side, left : left + side] = face
        scenes.append(scene)
    return scenes
