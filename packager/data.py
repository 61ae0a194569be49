"""Calibration and evaluation data: .npz files keyed by model input name."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .errors import DataError

LABELS_KEY = "labels"


def load_npz(
    path: Path, input_names: list[str], what: str
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Load ``path`` and check it against the model inputs.

    Returns the arrays by input name and, if present, the ``labels`` array.

    Raises:
        DataError: missing file, pickled content, a missing or unknown key, or sample
            counts that differ between arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except ValueError as exc:
        raise DataError(
            f"{what} file {path} holds object arrays, which need pickle; edgepack refuses "
            f"pickled data. Save plain numeric arrays with np.savez. ({exc})"
        ) from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{what} file {path} is not a readable .npz: {exc}") from None
    labels = arrays.pop(LABELS_KEY, None)
    missing = sorted(set(input_names) - set(arrays))
    unknown = sorted(set(arrays) - set(input_names))
    if missing or unknown:
        raise DataError(
            f"{what} file {path} must hold one array per model input {input_names} "
            f"(plus optional '{LABELS_KEY}'); missing {missing}, unknown {unknown}"
        )
    counts = {key: len(value) for key, value in arrays.items()}
    if labels is not None:
        counts[LABELS_KEY] = len(labels)
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise DataError(
            f"{what} file {path}: arrays need the same, non-zero sample count; got {counts}"
        )
    return arrays, labels


def sample(arrays: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    """One sample as a batch of one."""
    return {name: value[index : index + 1] for name, value in arrays.items()}


def sample_count(arrays: dict[str, np.ndarray]) -> int:
    return len(next(iter(arrays.values())))
