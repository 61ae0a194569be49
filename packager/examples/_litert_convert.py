"""Convert the trained digits CNN to .tflite with litert-torch: run INSIDE the converter venv.

Usage: python _litert_convert.py WEIGHTS.npz OUTPUT.tflite

The converter venv has torch, litert-torch and numpy but not edgepack, so this script imports
only those and the standard library; it loads the shared layer definition (``digits_net.py``,
next to it) by path. ``converter_venv.run_converter_script`` runs it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import litert_torch
import numpy as np
import torch


def load_digits_cnn(weights: Path) -> torch.nn.Module:
    """The digits CNN (same layers as the ONNX example) with the trained weights."""
    spec = importlib.util.spec_from_file_location(
        "digits_net", Path(__file__).with_name("digits_net.py")
    )
    digits_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits_net)
    net = digits_net.build_digits_cnn()
    with np.load(weights, allow_pickle=False) as arrays:
        state = {name: torch.from_numpy(arrays[name]) for name in arrays.files}
    net.load_state_dict(state, strict=True)
    return net.eval()


class NamedIO(torch.nn.Module):
    """Gives the TFLite signature the ONNX model's names: input ``image``, output ``logits``.

    litert-torch names an input after its keyword argument and an output after its dict key
    (positional ones become ``args_0`` and ``output_0``), so one eval .npz fits both models.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(image)}


def main(weights: Path, output: Path) -> None:
    model = NamedIO(load_digits_cnn(weights)).eval()
    # Batch 1: litert-torch 0.10 fails on a dynamic batch dimension for this network.
    sample = {"image": torch.zeros(1, 1, 8, 8, dtype=torch.float32)}
    with torch.no_grad():
        edge_model = litert_torch.convert(model, sample_args=(), sample_kwargs=sample)
    partial = output.with_name(output.name + ".partial")
    edge_model.export(str(partial))
    partial.replace(output)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.splitlines()[2])
    main(Path(sys.argv[1]), Path(sys.argv[2]))
