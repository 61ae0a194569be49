"""Run a model on a file of samples, such as the eval ``.npz`` a build was given.

A build's eval file holds the model inputs and often more (``labels``), and it holds many
samples while a model exported for batch 1 takes one at a time. ``run_samples`` accepts
both: arrays that are not model inputs are set aside (and named, so a caller can say so),
and a batch-1 model is fed sample by sample, its outputs joined into one array per output.
Anything else that does not fit (a missing input, a wrong dtype, a wrong size on an axis
other than the batch case) is still refused by ``Runtime.run`` with its usual message.

A bundle whose build recorded how its model is fed (constant inputs, batch axes other
than 0, a state carried across steps: the manifest's ``feeding``) is always fed sample by
sample through ``Runtime.feeder``, as the build's gate fed it: a constant input need not
be in the file, and a stateful model's samples are sequences.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputSignatureError
from .feeding import Feeder
from .manifest import TensorSpec

if TYPE_CHECKING:
    from .runtime import Runtime


@dataclass
class SampleRun:
    """What ``run_samples`` did.

    Attributes:
        outputs: output arrays by name; with ``one_by_one`` each holds one row per sample.
        ignored: names of the arrays that are not model inputs and were not fed.
        one_by_one: the model takes batch 1 and the file's samples were fed one at a time.
        samples: how many samples were run (the size of the inputs' first axis).
    """

    outputs: dict[str, np.ndarray]
    ignored: list[str] = field(default_factory=list)
    one_by_one: bool = False
    samples: int = 0


def split_inputs(
    specs: list[TensorSpec], arrays: Mapping[str, np.ndarray], required: list[str] | None = None
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays to feed and the names set aside as not model inputs.

    Extra arrays are set aside only when every ``required`` input (default: every model
    input) is present: when one is missing, everything is kept, so the input check names
    both the missing and the unknown arrays (a misspelt input name is then reported, not
    silently dropped).
    """
    names = {spec.name for spec in specs}
    needed = names if required is None else set(required)
    if not needed <= set(arrays):
        return dict(arrays), []
    ignored = sorted(set(arrays) - names)
    return {name: arrays[name] for name in arrays if name in names}, ignored


def feeds_one_by_one(specs: list[TensorSpec], inputs: Mapping[str, np.ndarray]) -> int | None:
    """The sample count when a batch-1 model must be fed ``inputs`` one sample at a time.

    That is when every input's first axis is fixed to 1 and every array holds the same
    number N > 1 of samples on its first axis (with the rank the input needs). None
    otherwise: the inputs then go to the model as they are, and are checked there.
    """
    counts = set()
    for spec in specs:
        value = inputs.get(spec.name)
        if not spec.shape or spec.shape[0] != 1 or not isinstance(value, np.ndarray):
            return None
        if value.ndim != len(spec.shape):
            return None
        counts.add(value.shape[0])
    if len(counts) != 1:
        return None
    count = counts.pop()
    return count if count > 1 else None


def run_samples(runtime: Runtime, arrays: Mapping[str, np.ndarray]) -> SampleRun:
    """Run ``runtime`` on a file's arrays: extra arrays set aside, batch 1 fed one by one.

    Args:
        runtime: an open tensor-model Runtime.
        arrays: arrays by name, e.g. every array of an eval ``.npz``.

    Returns:
        The outputs (one row per sample) and what was set aside or fed one by one.

    Raises:
        InputSignatureError: an input is missing, or has a wrong dtype, rank or size
            (other than N samples for a batch-1 model); the message names the signature.
        BackendError: the bundle holds a language model.
    """
    specs = runtime.manifest.inputs
    feeder = getattr(runtime, "feeder", None)
    if feeder is not None and not feeder.plain:
        return _run_fed(runtime, feeder, arrays)
    inputs, ignored = split_inputs(specs, arrays)
    count = feeds_one_by_one(specs, inputs)
    if count is None:
        outputs = runtime.run(inputs)
        first = next(iter(inputs.values()), None)
        samples = int(first.shape[0]) if isinstance(first, np.ndarray) and first.ndim else 1
        return SampleRun(outputs, ignored, False, samples)
    rows: dict[str, list[np.ndarray]] = {}
    for index in range(count):
        sample = {name: value[index : index + 1] for name, value in inputs.items()}
        for name, value in runtime.run(sample).items():
            rows.setdefault(name, []).append(value)
    outputs = {name: _join(values) for name, values in rows.items()}
    return SampleRun(outputs, ignored, True, count)


def _run_fed(runtime: Runtime, feeder: Feeder, arrays: Mapping[str, np.ndarray]) -> SampleRun:
    """Every sample through the bundle's feeder: batch axes, constants, carried state."""
    specs = runtime.manifest.inputs
    inputs, ignored = split_inputs(specs, arrays, feeder.data_inputs)
    missing = sorted(set(feeder.data_inputs) - set(inputs))
    if missing:
        raise InputSignatureError(
            f"the file lacks inputs {missing}; it needs one array per input "
            f"{feeder.data_inputs}, samples first"
            + (", each sample a sequence of steps" if feeder.sequential else "")
        )
    feeder.check_arrays(inputs)
    try:
        outputs = feeder.collect(runtime.run, inputs)
    except (IndexError, KeyError) as exc:
        raise InputSignatureError(
            f"the file's arrays do not fit the model: {exc}; it needs one array per input "
            f"{feeder.data_inputs}, samples first"
        ) from None
    return SampleRun(outputs, ignored, True, feeder.samples(inputs))


def _join(values: list[np.ndarray]) -> np.ndarray:
    """One array from per-sample outputs: batch-1 rows are concatenated, others stacked."""
    if values[0].ndim and values[0].shape[0] == 1:
        return np.concatenate(values, axis=0)
    return np.stack(values)
