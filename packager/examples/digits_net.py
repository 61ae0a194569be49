"""The digits CNN's layers: one definition for the trainer and the LiteRT converter script.

This module imports nothing but torch, because the converter script loads it by path in the
converter venv, where edgepack is not installed (see ``_litert_convert.py``).
"""

from __future__ import annotations


def build_digits_cnn():
    """A fresh, untrained ``torch.nn.Sequential``: image [N, 1, 8, 8] -> logits [N, 10].

    Layer order fixes both the random initialisation (under a seeded generator) and the
    ``state_dict`` keys the saved weights use, so change it only with both in mind.
    """
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )
