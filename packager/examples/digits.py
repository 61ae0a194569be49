"""A small CNN trained on scikit-learn's digits data set and exported to ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import save_npz_deterministic
from . import ExampleModel
from .digits_net import build_digits_cnn

SEED = 0
EPOCHS = 30
# The trained weights as plain arrays (state_dict keys), not a pickle: the LiteRT converter
# venv rebuilds the same network from them (see convert_digits_tflite).
WEIGHTS_NAME = "digits-cnn-weights.npz"


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
    top-1 agreement with the fp32 model. The trained weights go to ``WEIGHTS_NAME``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    result = ExampleModel(
        model=out_dir / "digits-cnn.onnx",
        calibration=out_dir / "digits-calibration.npz",
        eval=out_dir / "digits-eval.npz",
    )
    weights = out_dir / WEIGHTS_NAME
    if all(path.exists() for path in (result.model, result.calibration, result.eval, weights)):
        return result

    import torch

    torch.manual_seed(SEED)
    x_train, x_test, y_train, y_test = load_digits_split()
    net = build_digits_cnn()
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
    save_npz_deterministic(
        weights, {name: tensor.numpy() for name, tensor in net.state_dict().items()}
    )
    partial.replace(result.model)
    return result


def convert_digits_tflite(out_dir: Path) -> ExampleModel:
    """The trained CNN converted to ``digits-cnn.tflite`` by litert-torch (Google's converter).

    Signature ``serving_default``: input ``image`` float32 [1, 1, 8, 8] (the batch is fixed at
    1), output ``logits`` float32 [1, 10], so the ONNX example's calibration and eval data fit
    it too. litert-torch runs in its own venv (see ``converter_venv``); the first call builds
    it, which downloads 1.1 GiB and takes a minute or more.
    """
    trained = train_digits_cnn(out_dir)
    result = ExampleModel(
        model=out_dir / "digits-cnn.tflite", calibration=trained.calibration, eval=trained.eval
    )
    if result.model.exists():
        return result

    from .converter_venv import run_converter_script

    run_converter_script(
        Path(__file__).with_name("_litert_convert.py"), out_dir / WEIGHTS_NAME, result.model
    )
    return result
