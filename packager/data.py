"""Calibration and evaluation data: .npz files keyed by model input name.

A file holds its samples first, one array per model input. How each sample becomes the
model's feed (its batch axis, the constant inputs, the state a stateful model carries
across the steps of a sample) is the model's ``edge_runtime.feeding.Feeder``; a
``DataSet`` is one checked file with its feeder, which the passes run, calibrate and
gate on. A build may take several files (one per resolution of a dynamic-shape model).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime import npz_file
from edge_runtime.errors import EdgeRuntimeError, InputSignatureError
from edge_runtime.feeding import Feeder, Run
from edge_runtime.manifest import TensorSpec
from edge_runtime.runtime import check_inputs

from .errors import DataError

LABELS_KEY = "labels"
# A fixed timestamp keeps the zip headers free of wall-clock time (reproducible bundles).
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)


class _Refused(EdgeRuntimeError):
    """What ``edge_runtime.npz_file.read_npz`` refuses; ``read_npz`` raises a DataError."""


class _ObjectArray(_Refused):
    """An array of Python objects: on a build host, nearly always ragged samples."""


def read_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    """Every array of ``path``, each ``.npy`` header checked before anything is allocated.

    The device's reader does the checking (``edge_runtime.npz_file``): a build host is fed
    the same files, and a header claiming 1 TiB must be one error line here too.

    Raises:
        DataError: a missing or unreadable file; an object array: ragged samples (arrays
            must be rectangular; one file per resolution) or pickled content; a truncated
            or crafted file; arrays that need more memory than the machine has.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")
    try:
        return npz_file.read_npz(
            path, _Refused, label=f"{what} file {path}", objects_error=_ObjectArray
        )
    except _ObjectArray:
        raise DataError(
            f"{what} file {path} holds an object array: samples of different shapes, or "
            "other Python objects. Each array must be rectangular (every sample the same "
            "shape), saved with np.savez; put each resolution in a file of its own and "
            f"give --{what} once per file"
        ) from None
    except _Refused as exc:
        raise DataError(
            f"{exc} (--{what} takes an .npz written by np.savez: one array per model "
            "input, samples first)"
        ) from None


def load_npz(
    path: Path, input_names: list[str], what: str
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Load ``path`` and check it against the model inputs.

    Returns the arrays by input name and, if present, the ``labels`` array.

    Raises:
        DataError: missing file, pickled content, a missing or unknown key, or sample
            counts that differ between arrays.
    """
    arrays = read_npz(path, what)
    labels = arrays.pop(LABELS_KEY, None)
    missing = sorted(set(input_names) - set(arrays))
    unknown = sorted(set(arrays) - set(input_names))
    if missing or unknown:
        raise DataError(
            f"{what} file {path} must hold one array per model input {input_names} "
            f"(plus optional '{LABELS_KEY}'); missing {missing}, unknown {unknown}"
        )
    _same_counts(arrays, labels, path, what)
    return arrays, labels


def _same_counts(arrays: dict[str, np.ndarray], labels, path: Path, what: str) -> None:
    counts = {key: len(value) if value.ndim else 0 for key, value in arrays.items()}
    if labels is not None:
        counts[LABELS_KEY] = len(labels) if labels.ndim else 0
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise DataError(
            f"{what} file {path}: arrays need the same, non-zero sample count; got {counts}"
        )


@dataclass
class DataSet:
    """One checked calibration or eval file and how its samples feed the model.

    Attributes:
        path: the file.
        arrays: its arrays by input name, samples first, as in the file (no labels).
        labels: its ``labels`` array, or None.
        feeder: how a sample becomes the model's feed (batch axes, constants, state).
        reference: the source model's outputs on it, once computed (the gate's cache).
    """

    path: Path
    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    feeder: Feeder
    reference: dict[str, np.ndarray] | None = None

    @property
    def samples(self) -> int:
        return self.feeder.samples(self.arrays)

    @property
    def steps(self) -> int:
        """Steps per sample (1 unless the model carries a state across steps)."""
        return self.feeder.steps(self.arrays)

    def feeds(self, run: Run | None = None, samples: int | None = None) -> Iterator[dict]:
        """Batch-of-one feeds with batch axes, constants and state applied, sample by
        sample (and step by step); a stateful model's need ``run`` to carry the state."""
        return self.feeder.feeds(self.arrays, run, samples)

    def first_feed(self) -> dict[str, np.ndarray]:
        """The first sample's (first step's) feed, e.g. for timing the model."""
        step = 0 if self.feeder.sequential else None
        return self.feeder.feed(self.arrays, 0, step)

    def run(self, run: Run) -> dict[str, np.ndarray]:
        """``run`` on every sample: outputs by name, one row per sample (a stateful
        model's with its steps on axis 1)."""
        return self.feeder.collect(run, self.arrays)


def plain_dataset(arrays: dict[str, np.ndarray], labels=None, path: Path | None = None) -> DataSet:
    """Arrays fed as they are, sample by sample on axis 0 (no axes, constants or state)."""
    specs = [
        TensorSpec(name=name, dtype=str(value.dtype), shape=[]) for name, value in arrays.items()
    ]
    return DataSet(Path(path or "<arrays>"), arrays, labels, Feeder(specs))


def load_dataset(path: Path, feeder: Feeder, what: str) -> DataSet:
    """Read ``path`` and check it against the model and how it is fed.

    Raises:
        DataError: what ``read_npz`` refuses; an array for a --constant input; a missing
            or unknown array; differing sample (or step) counts; a sample whose feed does
            not fit the model's inputs (dtype, rank, fixed sizes).
    """
    path = Path(path)
    arrays = read_npz(path, what)
    labels = arrays.pop(LABELS_KEY, None)
    given_constants = sorted(set(arrays) & set(feeder.constants))
    if given_constants:
        raise DataError(
            f"{what} file {path} holds arrays {given_constants} for inputs that --constant "
            "sets; remove them from the file or drop the --constant"
        )
    required, optional = feeder.data_inputs, feeder.optional_inputs
    missing = sorted(set(required) - set(arrays))
    unknown = sorted(set(arrays) - set(required) - set(optional))
    if missing or unknown:
        extra = f", optional starting states {optional}" if optional else ""
        raise DataError(
            f"{what} file {path} must hold one array per model input {required} (plus "
            f"optional '{LABELS_KEY}'{extra}); missing {missing}, unknown {unknown}"
        )
    _same_counts(arrays, labels, path, what)
    try:
        feeder.check_arrays(arrays)
    except InputSignatureError as exc:
        raise DataError(f"{what} file {path}: {exc}") from None
    dataset = DataSet(path, arrays, labels, feeder)
    try:
        check_inputs(feeder.inputs, dataset.first_feed())
    except InputSignatureError as exc:
        where = "each step of a sample" if feeder.sequential else "each sample"
        raise DataError(
            f"{path}: {exc} ({where} is fed as a batch of one on its input's batch axis: "
            "axis 0, or the one --batch-axis names)"
        ) from None
    return dataset


def calibration_feeds(
    datasets: list[DataSet], limit: int | None = None, run: Run | None = None
) -> list[dict[str, np.ndarray]]:
    """Feeds for calibrating from every file, at most ``limit`` samples in all, shared
    between the files (a stateful model's samples give every step, the state carried by
    ``run``, e.g. the float model's)."""
    if not datasets:
        return []
    share = None if limit is None else max(1, limit // len(datasets))
    return [feed for dataset in datasets for feed in dataset.feeds(run, share)]


def sample(arrays: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    """One sample as a batch of one."""
    return {name: value[index : index + 1] for name, value in arrays.items()}


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
