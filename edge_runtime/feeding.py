"""Feeding a model the samples of a data file: batch axes, constant inputs, carried state.

A data file (a build's eval or calibration ``.npz``, or what ``edge-runtime run --input``
reads) holds its samples first, one array per input. The model takes a batch of one per
call, and real models differ in how:

- a recurrent state may hold its batch on another axis (``[layers, batch, units]``);
- an input may be a fixed value, such as a sample rate, that no data file repeats;
- a stateful model takes a sample as a sequence of steps, each step's state being the
  previous step's output (the first step's is zeros, or the sample's own value).

``Feeder`` turns a file's samples into the model's feeds, and the outputs back into one
row per sample, as the manifest's ``feeding`` section (``FeedingSpec``) says. The packager
gates and calibrates through it, and the device runs the build's files through it, so
both feed the model alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from .errors import InputSignatureError
from .manifest import FeedingSpec, TensorSpec

Run = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


def constant_array(spec: TensorSpec, value: Any) -> np.ndarray:
    """A manifest's constant ``value`` (a number or nested lists) as ``spec``'s array."""
    return np.asarray(value, dtype=np.dtype(spec.dtype))


class Feeder:
    """How one model is fed: its inputs' batch axes, constant inputs and carried state.

    With no ``FeedingSpec`` (or an empty one), a sample is fed as a batch of one on axis 0
    and nothing else happens: the plain case every older bundle has.
    """

    def __init__(
        self,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec] | None = None,
        spec: FeedingSpec | None = None,
    ) -> None:
        self.inputs = inputs
        self.outputs = outputs or []
        self.spec = spec or FeedingSpec()
        by_name = {input_spec.name: input_spec for input_spec in inputs}
        self.constants = {
            name: constant_array(by_name[name], value)
            for name, value in self.spec.constants.items()
            if name in by_name
        }
        self.state = dict(self.spec.state)
        self.batch_axes = dict(self.spec.batch_axes)
        # A state output holds its batch where the input it feeds does, unless told.
        self.output_batch_axes = {
            output: self.batch_axes.get(state_input, 0)
            for state_input, output in self.state.items()
        }
        self.output_batch_axes.update(self.spec.output_batch_axes)

    @property
    def plain(self) -> bool:
        """Samples are fed on axis 0 with nothing added: no constant, axis or state."""
        spec = self.spec
        return not (spec.constants or spec.batch_axes or spec.output_batch_axes or spec.state)

    @property
    def sequential(self) -> bool:
        """A sample is a sequence of steps (a state input is carried from step to step)."""
        return bool(self.state)

    @property
    def data_inputs(self) -> list[str]:
        """The inputs a data file must hold: not the constants, and not the state (whose
        starting value a file may give, and otherwise is zeros)."""
        return [
            spec.name
            for spec in self.inputs
            if spec.name not in self.constants and spec.name not in self.state
        ]

    @property
    def optional_inputs(self) -> list[str]:
        """Inputs a data file may hold: the state's starting value."""
        return list(self.state)

    def samples(self, arrays: Mapping[str, np.ndarray]) -> int:
        """How many samples ``arrays`` hold (the first axis of the data inputs)."""
        names = self.data_inputs or [name for name in self.optional_inputs if name in arrays]
        return int(len(arrays[names[0]])) if names else 1

    def steps(self, arrays: Mapping[str, np.ndarray]) -> int:
        """Steps per sample: the second axis of the data inputs of a sequential model, else 1."""
        if not self.sequential or not self.data_inputs:
            return 1
        return int(arrays[self.data_inputs[0]].shape[1])

    def check_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Refuse data arrays of the wrong rank, or sequences of differing step counts.

        Raises:
            InputSignatureError: an array without the sample (and, for a stateful model,
                step) axis, or with a different number of steps than the others.
        """
        ranks = {spec.name: len(spec.shape) for spec in self.inputs}
        steps = {}
        for name in self.data_inputs:
            if name not in arrays:
                continue
            shape, rank = list(np.shape(arrays[name])), ranks[name]
            if self.sequential and len(shape) != rank + 1:
                raise InputSignatureError(
                    f"each sample is a sequence (the model carries a state across steps), so "
                    f"array {name!r} needs [samples, steps, ...]: {rank + 1} axes, the "
                    f"input's own with its batch axis replaced by samples, then steps; it has "
                    f"shape {shape}"
                )
            if not self.sequential and len(shape) != rank:
                raise InputSignatureError(
                    f"array {name!r} needs [samples, ...]: {rank} axes, the input's own with "
                    f"its batch axis replaced by samples; it has shape {shape}"
                )
            if self.sequential:
                steps[name] = shape[1]
        if len(set(steps.values())) > 1 or 0 in steps.values():
            raise InputSignatureError(
                f"each sample is a sequence: the arrays need the same, non-zero step count "
                f"(axis 1); got {steps}"
            )

    def feed(
        self,
        arrays: Mapping[str, np.ndarray],
        index: int,
        step: int | None = None,
        state: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Sample ``index`` (at ``step``, for a sequential model) as one batch-of-one feed.

        ``state`` holds the state inputs' values; None starts them (``initial_state``).
        """
        feed: dict[str, np.ndarray] = {}
        for name in self.data_inputs:
            value = arrays[name][index] if step is None else arrays[name][index, step]
            feed[name] = np.expand_dims(value, self.batch_axes.get(name, 0))
        if self.sequential:
            feed.update(self.initial_state(arrays, index) if state is None else state)
        feed.update(self.constants)
        return feed

    def initial_state(self, arrays: Mapping[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
        """Each state input's value at the first step: the sample's own, else zeros."""
        values = {}
        by_name = {spec.name: spec for spec in self.inputs}
        for name in self.state:
            axis = self.batch_axes.get(name, 0)
            if name in arrays:
                values[name] = np.expand_dims(arrays[name][index], axis)
                continue
            spec = by_name[name]
            shape = [1 if position == axis else dim for position, dim in enumerate(spec.shape)]
            if not all(isinstance(dim, int) for dim in shape):
                raise InputSignatureError(
                    f"state input {name!r} has a free axis ({spec.describe()}), so it cannot "
                    f"start at zeros; give each sample's starting state as an array {name!r} "
                    "in the data file"
                )
            values[name] = np.zeros(shape, dtype=np.dtype(spec.dtype))
        return values

    def run(
        self, run: Run, arrays: Mapping[str, np.ndarray], samples: int | None = None
    ) -> Iterator[tuple[int, dict[str, np.ndarray], Mapping[str, np.ndarray]]]:
        """Run the first ``samples`` samples (all by default): (sample index, feed,
        outputs) per call, in order; a sequential model's state is carried across steps."""
        count = self.samples(arrays) if samples is None else min(samples, self.samples(arrays))
        for index in range(count):
            if not self.sequential:
                feed = self.feed(arrays, index)
                yield index, feed, run(feed)
                continue
            state = None
            for step in range(self.steps(arrays)):
                feed = self.feed(arrays, index, step, state)
                outputs = run(feed)
                state = {name: outputs[output] for name, output in self.state.items()}
                yield index, feed, outputs

    def feeds(
        self, arrays: Mapping[str, np.ndarray], run: Run | None = None, samples: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """The feeds of the first ``samples`` samples. A sequential model's feeds carry the
        state ``run`` computes (e.g. the float model's), so ``run`` is then required."""
        if self.sequential:
            if run is None:
                raise ValueError("a sequential model's feeds need a run function for the state")
            for _, feed, _ in self.run(run, arrays, samples):
                yield feed
            return
        count = self.samples(arrays) if samples is None else min(samples, self.samples(arrays))
        for index in range(count):
            yield self.feed(arrays, index)

    def collect(self, run: Run, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run every sample; outputs with one row per sample (a sequential model's with
        its steps on axis 1)."""
        rows: dict[str, list[list[np.ndarray]]] = {}
        for index, _, outputs in self.run(run, arrays):
            for name, value in outputs.items():
                per_sample = rows.setdefault(name, [])
                if len(per_sample) <= index:
                    per_sample.append([])
                per_sample[index].append(self.output_row(name, value))
        joined = {}
        for name, per_sample in rows.items():
            if self.sequential:
                joined[name] = np.stack([np.concatenate(steps) for steps in per_sample])
            else:
                joined[name] = np.concatenate([steps[0] for steps in per_sample])
        return joined

    def output_row(self, name: str, value: np.ndarray) -> np.ndarray:
        """A batch-of-one output as one row on axis 0 (an output without a batch axis
        of size 1 where expected gets a new axis 0)."""
        value = np.asarray(value)
        axis = self.output_batch_axes.get(name, 0)
        if value.ndim > axis and value.shape[axis] == 1:
            return np.moveaxis(value, axis, 0)
        return np.expand_dims(value, 0)

    def input_row(self, name: str, value: np.ndarray) -> np.ndarray:
        """A batch-of-one input as one row on axis 0 (to store it samples first)."""
        return np.moveaxis(np.asarray(value), self.batch_axes.get(name, 0), 0)

    def row_feed(self, rows: Mapping[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
        """Row ``index`` of arrays stored samples first (``input_row``), as a feed;
        constants are left to the caller (``Runtime.run`` fills them in)."""
        return {
            name: np.expand_dims(value[index], self.batch_axes.get(name, 0))
            for name, value in rows.items()
        }
