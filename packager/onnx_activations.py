"""Intermediate activations of an ONNX model and of its QDQ int8 version, side by side.

The mixed-precision search (``packager.passes.onnx_mixed``) needs, per float tensor, its
range on calibration data and how much quantization noise the QDQ model's version of it
carries. This is what ONNX Runtime's ``qdq_loss_debug`` does (every intermediate tensor
made a graph output, pre/post-QDQ tensors matched by the quantizer's names, an SQNR per
tensor), with two differences that matter on real models:

- the tensors keep their shapes, and the noise is also measured per channel (axis 1 and
  the last axis) with the median channel reported when worse than the whole tensor: one
  dominant channel (an outlier feature of a transformer, an un-normalised output) sets a
  per-tensor int8 scale that crushes every other channel, yet the whole-tensor SQNR,
  dominated by that channel's power, still looks fine;
- samples are streamed and reduced to sums, so no tensor is kept in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

SQNR_CAP_DB = 120.0  # a tensor with no measurable noise (an exact match)

# onnxruntime.quantization's names for the tensors around a QDQ pair (quant_utils): the
# producer's output keeps its name and a consumer reads NAME_DequantizeLinear_Output
# (..._Output_1 for a second pair), except for a graph output, whose producer writes
# NAME_QuantizeLinear_Input and whose DequantizeLinear writes NAME.
QUANT_INPUT_SUFFIX = "_QuantizeLinear_Input"
DEQUANT_OUTPUT_SUFFIX = "_DequantizeLinear_Output"


def with_intermediate_outputs(path: Path, out_path: Path) -> Path:
    """``path`` with every float32 tensor a node writes also a graph output (``out_path``)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # contrib ops shape inference does not know: keep what is declared
        inferred = model
    infos = list(inferred.graph.value_info) + list(inferred.graph.output)
    types = {info.name: info.type.tensor_type.elem_type for info in infos}
    present = {output.name for output in model.graph.output}
    for node in model.graph.node:
        for tensor in node.output:
            if tensor and tensor not in present and types.get(tensor) == TensorProto.FLOAT:
                model.graph.output.append(
                    helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None)
                )
                present.add(tensor)
    onnx.save(model, str(out_path))
    return out_path


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # As qdq_loss_debug's collect_activations: no fusion, so each tensor is what the graph
    # says and QDQ pairs simulate int8 in float.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, [output.name for output in session.get_outputs()]


def seen_by_consumers(tensor: str, qdq_names: set[str]) -> str | None:
    """The QDQ model's name for what ``tensor``'s consumers read (after its QDQ pair)."""
    for name in (tensor + DEQUANT_OUTPUT_SUFFIX, tensor + DEQUANT_OUTPUT_SUFFIX + "_1"):
        if name in qdq_names:
            return name
    if tensor + QUANT_INPUT_SUFFIX in qdq_names or tensor in qdq_names:
        return tensor
    return None


@dataclass
class _Noise:
    """Sums of signal and noise power, for the whole tensor and per channel on some axes."""

    signal: float = 0.0
    noise: float = 0.0
    channels: dict[int, tuple] = field(default_factory=dict)  # axis -> (signal, noise) arrays

    def add(self, reference, got) -> None:
        import numpy as np

        error = np.square(reference - got)
        power = np.square(reference)
        self.signal += float(power.sum())
        self.noise += float(error.sum())
        axes = {1, reference.ndim - 1} if reference.ndim >= 2 else set()
        for axis in sorted(axes):
            others = tuple(a for a in range(reference.ndim) if a != axis)
            per_signal, per_noise = power.sum(axis=others), error.sum(axis=others)
            known = self.channels.get(axis)
            if known is None:
                self.channels[axis] = (per_signal, per_noise)
            elif known[0].shape == per_signal.shape:
                self.channels[axis] = (known[0] + per_signal, known[1] + per_noise)
            else:  # a dynamic axis, not a channel one
                self.channels[axis] = (None, None)

    def sqnr(self) -> float | None:
        """dB: the whole tensor's, or the median channel's when that is worse."""
        import numpy as np

        if self.signal <= 0:
            return None
        worst = _db(self.signal, self.noise)
        for per_signal, per_noise in self.channels.values():
            if per_signal is None or len(per_signal) < 2:
                continue
            live = per_signal > 0
            if live.sum() >= 2:
                ratios = [_db(s, n) for s, n in zip(per_signal[live], per_noise[live], strict=True)]
                worst = min(worst, float(np.median(ratios)))
        return worst


def _db(signal: float, noise: float) -> float:
    if noise <= signal * 10 ** (-SQNR_CAP_DB / 10):
        return SQNR_CAP_DB
    return 10 * math.log10(signal / noise)


@dataclass
class Activations:
    """Per float tensor: its range on the samples, and (with a QDQ model) the SQNR in dB
    of what the QDQ model's consumers read against the float value."""

    ranges: dict[str, tuple[float, float]]
    sqnr: dict[str, float]


def measure_activations(
    float_path: Path, qdq_path: Path | None, samples: list[dict], work: Path
) -> Activations:
    """Run the float model (and the QDQ one) on ``samples`` (feed dicts, as the build feeds
    the model), every intermediate tensor an output; graph inputs count as tensors too."""
    import numpy as np

    float_session, float_names = _session(with_intermediate_outputs(float_path, work / "f.onnx"))
    qdq = None
    if qdq_path is not None:
        qdq_session, qdq_names = _session(with_intermediate_outputs(qdq_path, work / "q.onnx"))
        qdq = (qdq_session, qdq_names, set(qdq_names))
    ranges: dict[str, tuple[float, float]] = {}
    noise: dict[str, _Noise] = {}
    for feeds in samples:
        values = dict(zip(float_names, float_session.run(float_names, feeds), strict=True))
        values.update({k: v for k, v in feeds.items() if v.dtype == np.float32})
        for name, value in values.items():
            if value.size:
                ranges[name] = _widen(ranges.get(name), value)
        if qdq is None:
            continue
        qdq_session, qdq_names, known = qdq
        wanted = {name: seen_by_consumers(name, known) for name in values}
        fetch = sorted({other for other in wanted.values() if other is not None})
        quantized = dict(zip(fetch, qdq_session.run(fetch, feeds), strict=True))
        for name, reference in values.items():
            other = wanted[name]
            if other is None:  # a graph input the QDQ model does not quantize
                continue
            got = quantized[other]
            if got.shape != reference.shape or not reference.size:
                continue
            clean = np.nan_to_num(reference.astype(np.float64), posinf=0.0, neginf=0.0)
            noisy = np.nan_to_num(got.astype(np.float64), posinf=0.0, neginf=0.0)
            noise.setdefault(name, _Noise()).add(clean, noisy)
    sqnr = {name: value for name, n in noise.items() if (value := n.sqnr()) is not None}
    return Activations(ranges, sqnr)


def _widen(known: tuple[float, float] | None, value) -> tuple[float, float]:
    import numpy as np

    finite = value[np.isfinite(value)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if np.isneginf(value).any():  # a -inf fill is as huge as it gets
        low = -math.inf
    if np.isposinf(value).any():
        high = math.inf
    if known is None:
        return low, high
    return min(known[0], low), max(known[1], high)
