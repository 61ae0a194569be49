"""A small CNN trained on scikit-learn's digits data set and exported to ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import ExampleModel
from .data_io import save_npz_deterministic

SEED = 0
EPOCHS = 30


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as float32 images [N, 1, 8, 8] in [0, 1], split 70/30 with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    return train_test_split(images, labels, test_size=0.3, random_state=SEED, stratify=labels)


def train_digits_cnn(out_dir: Path) -> ExampleModel:
    """Train the CNN and write ``digits-cnn.onnx`` plus calibration and eval data.

    The eval file also holds ``labels``, so the packager reports accuracy as well as
    top-1 agreement with the fp32 model.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    result = ExampleModel(
        model=out_dir / "digits-cnn.onnx",
        calibration=out_dir / "digits-calibration.npz",
        eval=out_dir / "digits-eval.npz",
    )
    if all(path.exists() for path in (result.model, result.calibration, result.eval)):
        return result

    import torch

    torch.manual_seed(SEED)
    x_train, x_test, y_train, y_test = load_digits_split()
    net = torch.nn.Sequential(
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
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    images, targets = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(images[batch]), targets[batch])
            loss.backward()
            optimizer.step()
    net.eval()

    partial = result.model.with_suffix(".onnx.partial")
    with torch.no_grad():
        torch.onnx.export(
            net,
            (images[:1],),
            str(partial),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    save_npz_deterministic(result.calibration, {"image": x_train[:200]})
    save_npz_deterministic(result.eval, {"image": x_test, "labels": y_test})
    partial.replace(result.model)
    return result
