"""Calibration and evaluation data: .npz files keyed by model input name."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from edge_runtime.errors import InputSignatureError
from edge_runtime.runtime import check_inputs

from .errors import DataError

LABELS_KEY = "labels"
# A fixed timestamp keeps the zip headers free of wall-clock time (reproducible bundles).
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)


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


def check_data(specs, arrays: dict[str, np.ndarray], path: Path) -> None:
    """Refuse data whose dtype or fixed sizes cannot feed the model, before any work."""
    try:
        check_inputs(specs, sample(arrays, 0))
    except InputSignatureError as exc:
        raise DataError(
            f"{path}: {exc} (the model takes one sample per call on its first axis)"
        ) from None


def save_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` like ``np.savez`` but byte-identically for identical arrays."""
    path.write_bytes(npz_bytes(arrays))


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_DATE)
            info.external_attr = 0o644 << 16
            member = io.BytesIO()
            np.lib.format.write_array(
                member, np.ascontiguousarray(arrays[name]), allow_pickle=False
            )
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()
