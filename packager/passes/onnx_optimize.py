"""OnnxGraphOptimize: offline ONNX Runtime graph optimization."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .base import ModelArtifact, Pass, PassConfig, PassContext, PassOutput


class OnnxGraphOptimizeConfig(PassConfig):
    level: Literal["disabled", "basic", "extended"] = Field(
        "basic",
        description="'basic' folds constants and removes redundant nodes with standard ONNX "
        "ops only; 'extended' adds ONNX Runtime contrib fusions (CPU/CUDA only)",
    )


class OnnxGraphOptimize(Pass):
    name = "OnnxGraphOptimize"
    Config = OnnxGraphOptimizeConfig

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        import onnx
        import onnxruntime as ort

        output = out_dir / "model.onnx"
        if self.config.level == "disabled":
            # Still re-save: external data gets inlined, so later passes see one file.
            onnx.save(onnx.load(str(model.path)), str(output))
            return PassOutput(ModelArtifact(output, "onnx", model.precision))
        levels = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        }
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[self.config.level]
        options.optimized_model_filepath = str(output)
        ort.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"])
        return PassOutput(ModelArtifact(output, "onnx", model.precision))
