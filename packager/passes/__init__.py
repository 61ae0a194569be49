"""Packager passes. Importing this package registers every pass by name."""

from .base import PASSES, ModelArtifact, Pass, PassConfig, PassContext, PassOutput, get_pass
from .evaluate import Evaluate
from .gguf import GgufEvaluate, GgufQuantize, GgufValidate
from .measure import GgufMeasure, Measure
from .onnx_mixed import OnnxMixedPrecisionQuantize
from .onnx_opset import OnnxOpsetUpgrade
from .onnx_optimize import OnnxGraphOptimize
from .onnx_quantize import OnnxDynamicQuantize, OnnxStaticQuantize, OnnxToFloat16
from .onnx_validate import OnnxValidate
from .onnx_weights import OnnxFloat16Weights, OnnxInt8Weights
from .package import Package
from .tflite import TfliteQuantize, TfliteValidate

__all__ = [
    "PASSES",
    "Evaluate",
    "GgufEvaluate",
    "GgufMeasure",
    "GgufQuantize",
    "GgufValidate",
    "Measure",
    "ModelArtifact",
    "OnnxDynamicQuantize",
    "OnnxFloat16Weights",
    "OnnxGraphOptimize",
    "OnnxInt8Weights",
    "OnnxMixedPrecisionQuantize",
    "OnnxOpsetUpgrade",
    "OnnxStaticQuantize",
    "OnnxToFloat16",
    "OnnxValidate",
    "Package",
    "Pass",
    "PassConfig",
    "PassContext",
    "PassOutput",
    "TfliteQuantize",
    "TfliteValidate",
    "get_pass",
]
