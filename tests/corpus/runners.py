"""Running a model on arrays: the float source through its own engine, a bundle through
``edge_runtime.Runtime``. Both take inputs by the source model's names, samples on axis 0
(or the input's batch axis), and return outputs in the source model's order.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

Outputs = list[np.ndarray]


def _take(array: np.ndarray, start: int, stop: int, axis: int) -> np.ndarray:
    return np.take(array, range(start, stop), axis=axis)


class Runner:
    """Feeds ``inputs`` (a dict of stacked samples) in chunks and stacks the outputs.

    ``batch_axes`` names inputs whose samples lie on another axis (a recurrent state);
    ``fixed`` holds inputs that are not per sample (a sample rate) and are fed whole.
    """

    names: list[str]
    max_batch: int

    def __init__(self, batch_axes: Mapping[str, int] | None = None) -> None:
        self.batch_axes = dict(batch_axes or {})

    def run_batch(self, inputs: dict[str, np.ndarray]) -> Outputs:
        raise NotImplementedError

    def __call__(
        self, inputs: Mapping[str, np.ndarray], fixed: Mapping[str, np.ndarray] | None = None
    ) -> Outputs:
        per_sample = {name: value for name, value in inputs.items() if name in self.names}
        first = next(iter(per_sample))
        count = per_sample[first].shape[self.batch_axes.get(first, 0)]
        chunks: list[Outputs] = []
        for start in range(0, count, self.max_batch):
            stop = min(count, start + self.max_batch)
            feed = {
                name: _take(value, start, stop, self.batch_axes.get(name, 0))
                for name, value in per_sample.items()
            }
            feed.update({k: v for k, v in (fixed or {}).items() if k in self.names})
            chunks.append(self.run_batch(feed))
        return [np.concatenate(parts, axis=0) for parts in zip(*chunks, strict=True)]


class OnnxSource(Runner):
    """The float ONNX file through a plain onnxruntime session (no edgepack code)."""

    def __init__(self, path: Path, batch_axes=None, max_batch: int = 8) -> None:
        super().__init__(batch_axes)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.max_batch = max_batch

    def run_batch(self, inputs):
        return self.session.run(None, inputs)


class TfliteSource(Runner):
    """The float TFLite file through LiteRT's interpreter, by tensor order (no signature
    needed), one sample at a time."""

    max_batch = 1

    def __init__(self, path: Path) -> None:
        super().__init__()
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=2)
        self.interpreter.allocate_tensors()
        self.inputs = self.interpreter.get_input_details()
        self.outputs = self.interpreter.get_output_details()
        self.names = [d["name"] for d in self.inputs]
        self.output_names = [d["name"] for d in self.outputs]

    def run_batch(self, inputs):
        for detail in self.inputs:
            self.interpreter.set_tensor(detail["index"], inputs[detail["name"]])
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(d["index"]).copy() for d in self.outputs]


class BundleRunner(Runner):
    """A bundle run by ``edge_runtime.Runtime``: what a device runs.

    The bundle's inputs and outputs are matched to the source's by name, else by position
    (a converter may rename them). Inputs the bundle does not take (a --constant folded in)
    are left out. A bundle whose first input has batch 1 is fed one sample at a time.
    """

    def __init__(self, runtime, source: Runner, batch_axes=None) -> None:
        super().__init__(batch_axes)
        self.runtime = runtime
        manifest = runtime.manifest
        bundle_inputs = [spec.name for spec in manifest.inputs]
        bundle_outputs = [spec.name for spec in manifest.outputs]
        self.feed_as = _match(source.names, bundle_inputs)
        self.names = [name for name in source.names if name in self.feed_as]
        self.output_as = _match(bundle_outputs, source.output_names, strict=True)
        self.output_names = source.output_names
        axis0 = manifest.inputs[0].shape[self.batch_axes.get(manifest.inputs[0].name, 0)]
        self.max_batch = 1 if axis0 == 1 else 16

    def run_batch(self, inputs):
        outputs = self.runtime.run({self.feed_as[name]: value for name, value in inputs.items()})
        by_source = {self.output_as[name]: value for name, value in outputs.items()}
        return [by_source[name] for name in self.output_names]


def _match(ours: list[str], theirs: list[str], strict: bool = False) -> dict[str, str]:
    """Our names -> theirs: the same name where it exists, else the name at our position
    when both lists have the same length; unmatched names are left out (strict: refused)."""
    if set(ours) <= set(theirs):
        return {name: name for name in ours}
    if len(ours) == len(theirs):
        return dict(zip(ours, theirs, strict=True))
    matched = {name: name for name in ours if name in theirs}
    if strict and len(matched) != len(ours):
        raise AssertionError(f"cannot match {ours} to {theirs}")
    return matched


def source_runner(path: Path, batch_axes=None) -> Runner:
    if path.suffix == ".tflite":
        return TfliteSource(path)
    return OnnxSource(path, batch_axes)
