"""ONNX precision passes: int8 dynamic, int8 static QDQ, and fp16."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..errors import DataError
from .base import ModelArtifact, Pass, PassConfig, PassContext, PassOutput


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}[name]


@contextlib.contextmanager
def _quiet_root_logger():
    """The quantizer logs advice and per-tensor notes on the root logger; keep them out of
    the build output (failures still raise)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _default_tensor_type() -> dict:
    # Tells the quantizer that outputs of ops it cannot type-infer are float; without it,
    # graphs holding ORT contrib ops fail to quantize.
    import onnx

    return {"DefaultTensorType": onnx.TensorProto.FLOAT}


# QDQ is the int8 form TensorRT and the CPU EP both consume.
QDQ_PROVIDERS = frozenset(
    {"CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"}
)


class OnnxDynamicQuantizeConfig(PassConfig):
    per_channel: bool = Field(True, description="one scale per output channel of each weight")
    weight_type: Literal["qint8", "quint8"] = Field("qint8", description="int8 weight type")


class OnnxDynamicQuantize(Pass):
    """Weights to int8 ahead of time; activations quantized on the fly at run time."""

    name = "OnnxDynamicQuantize"
    Config = OnnxDynamicQuantizeConfig
    # MatMulInteger / DynamicQuantizeMatMul have fast kernels only on ONNX Runtime's CPU EP.
    supported_providers = frozenset({"CPUExecutionProvider"})

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        from onnxruntime.quantization import quantize_dynamic

        output = out_dir / "model.onnx"
        with _quiet_root_logger():
            quantize_dynamic(
                str(model.path),
                str(output),
                per_channel=self.config.per_channel,
                weight_type=_quant_type(self.config.weight_type),
                extra_options=_default_tensor_type(),
            )
        return PassOutput(ModelArtifact(output, "onnx", "int8"))


class OnnxStaticQuantizeConfig(PassConfig):
    per_channel: bool = Field(True, description="one scale per output channel of each weight")
    activation_type: Literal["qint8", "quint8"] = Field("quint8", description="activation type")
    weight_type: Literal["qint8", "quint8"] = Field("qint8", description="weight type")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="how activation ranges are found from the calibration data"
    )
    max_samples: int = Field(64, gt=0, description="calibration samples used at most")


class OnnxStaticQuantize(Pass):
    """Weights and activations to int8 in QDQ form, ranges from calibration data."""

    name = "OnnxStaticQuantize"
    Config = OnnxStaticQuantizeConfig
    supported_providers = QDQ_PROVIDERS
    needs_calibration = True

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        output = out_dir / "model.onnx"
        cache = shared_calibration_cache(ctx, model.path, self.config)
        quantize_qdq(model.path, output, self.config, ctx, calibration_cache=cache)
        return PassOutput(ModelArtifact(output, "onnx", "int8"))


def shared_calibration_cache(ctx: PassContext, model: Path, config) -> Path:
    """Where the activation ranges of ``model`` under ``config``'s method and sample count
    are kept for this build: recipes that quantize the same prepared model (static,
    mixed) calibrate it once. The ranges are by tensor name, so a copy of the model with
    its nodes renamed shares them."""
    key = hashlib.sha256(str(Path(model).resolve()).encode()).hexdigest()[:12]
    name = f"calibration-{key}-{config.calibrate_method}-{config.max_samples}.json"
    return ctx.workdir / name


def quantize_qdq(
    source: Path,
    output: Path,
    config: OnnxStaticQuantizeConfig,
    ctx: PassContext,
    nodes_to_exclude: list[str] | tuple[str, ...] = (),
    calibration_cache: Path | None = None,
) -> None:
    """Static QDQ int8 of ``source`` into ``output``, activation ranges calibrated on
    ``ctx.calibration`` with ``config.calibrate_method``; ``nodes_to_exclude`` (node names)
    stay float: no QDQ on their inputs and outputs, their weights not quantized.

    ``calibration_cache``: a JSON file of the ranges, written by the first call and read by
    the next ones (ONNX Runtime 1.2x and later; older ones calibrate every time), so a
    search that quantizes one model many times calibrates once.
    """
    import inspect

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        quantize_static,
    )

    if ctx.calibration is None:
        raise DataError("static quantization needs --calibration FILE.npz")
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    cache = {}
    if calibration_cache is not None and (
        "calibration_cache_path" in inspect.signature(quantize_static).parameters
    ):
        cache = {"calibration_cache_path": str(calibration_cache)}
    reader = None
    if cache and calibration_cache.is_file():
        ctx.progress(f"calibration: the {config.calibrate_method} ranges of the first run")
    else:
        # Every --calibration file, fed as the model is (batch axes, constants, state).
        feeds = ctx.calibration_feeds(config.max_samples)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.index = 0

            def get_next(self):
                if self.index >= len(feeds):
                    return None
                self.index += 1
                return feeds[self.index - 1]

        reader = Reader()
        ctx.progress(f"calibrating on {len(feeds)} samples ({config.calibrate_method})")
    printed = io.StringIO()
    # The histogram calibrators (percentile, entropy) print their progress on stdout,
    # which belongs to the CLI (--json); what they say is summed up in one progress line.
    with _quiet_root_logger(), contextlib.redirect_stdout(printed):
        quantize_static(
            str(source),
            str(output),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=config.per_channel,
            activation_type=_quant_type(config.activation_type),
            weight_type=_quant_type(config.weight_type),
            calibrate_method=methods[config.calibrate_method],
            nodes_to_exclude=list(nodes_to_exclude),
            extra_options=_default_tensor_type(),
            **cache,
        )
    summary = _calibrator_summary(printed.getvalue())
    if summary:
        ctx.progress(summary)


def _calibrator_summary(printed: str) -> str | None:
    """e.g. "calibration: entropy thresholds for 205 tensors (2048 histogram bins)", from
    ONNX Runtime's histogram calibrator output."""
    method = re.search(r"using '(\w+)' algorithm", printed)
    tensors = re.search(r"Number of tensors\s*:\s*(\d+)", printed)
    bins = re.search(r"Number of histogram bins\s*:\s*(\d+)", printed)
    if not method:
        return None
    line = f"calibration: {method[1]} thresholds"
    if tensors:
        line += f" for {tensors[1]} tensors"
    if bins:
        line += f" ({bins[1]} histogram bins)"
    return line


class OnnxToFloat16Config(PassConfig):
    keep_io_types: bool = Field(
        True, description="keep float32 inputs and outputs, so callers need no change"
    )
    op_block_list: list[str] | None = Field(
        None, description="op types kept in float32 (None: onnxconverter-common's default)"
    )


class OnnxToFloat16(Pass):
    """Weights and compute to float16 (for GPUs and ARMv8.2+ CPUs)."""

    name = "OnnxToFloat16"
    Config = OnnxToFloat16Config

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        import onnx
        from onnx import TensorProto
        from onnxconverter_common import float16

        proto = onnx.load(str(model.path))
        kwargs = {"keep_io_types": self.config.keep_io_types}
        if self.config.op_block_list is not None:
            kwargs["op_block_list"] = self.config.op_block_list
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            converted = float16.convert_float_to_float16(proto, **kwargs)
        summary = clamped_summary(proto, caught)
        if summary:
            ctx.progress(summary)
        # onnxconverter-common retypes tensors but leaves Cast(to=float) nodes alone, which
        # then contradict their now-float16 outputs; point those casts at float16.
        types = {
            info.name: info.type.tensor_type.elem_type
            for info in list(converted.graph.value_info) + list(converted.graph.output)
        }
        for node in converted.graph.node:
            if node.op_type != "Cast":
                continue
            for attribute in node.attribute:
                if (
                    attribute.name == "to"
                    and attribute.i == TensorProto.FLOAT
                    and types.get(node.output[0]) == TensorProto.FLOAT16
                ):
                    attribute.i = TensorProto.FLOAT16
        output = out_dir / "model.onnx"
        onnx.save(converted, str(output))
        return PassOutput(ModelArtifact(output, "onnx", "fp16"))


# onnxconverter-common warns once per tensor end it clamps into float16's range.
_TRUNCATED = re.compile(r"the float32 number (\S+) will be truncated to (\S+)")


def clamped_summary(proto, caught: list[warnings.WarningMessage]) -> str | None:
    """One line for onnxconverter-common's per-tensor "will be truncated" warnings: how many
    weights were clamped into float16's range, and the worst one. Other warnings are
    passed on unchanged.
    """
    import numpy as np
    from onnx import TensorProto, numpy_helper

    pairs = []
    for warning in caught:
        match = _TRUNCATED.search(str(warning.message))
        if match is None:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
            continue
        pairs.append((float(match[1]), float(match[2])))
    if not pairs:
        return None
    # The bounds the converter clamped to: the smallest positive and largest finite value.
    tiny = min((abs(target) for _, target in pairs if abs(target) < 1), default=0.0)
    huge = max((abs(target) for _, target in pairs if abs(target) >= 1), default=math.inf)
    count = 0
    for tensor in proto.graph.initializer:
        if tensor.data_type != TensorProto.FLOAT:
            continue
        values = np.abs(numpy_helper.to_array(tensor))
        count += int(np.count_nonzero((values > 0) & (values < tiny)))
        count += int(np.count_nonzero(values > huge))
    value, target = max(pairs, key=lambda pair: abs(math.log10(abs(pair[0]) / abs(pair[1]))))
    return (
        f"fp16: {max(count, len(pairs))} float32 weights were clamped into the range "
        f"float16 holds; the worst: {value:.4g} -> {target:.4g}"
    )
