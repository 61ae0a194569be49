"""OnnxValidate: refuse malformed or unsafe ONNX models before any work is done."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ..errors import ModelValidationError
from ..onnx_model import external_data_files, model_signature
from .base import ModelArtifact, Pass, PassConfig, PassContext, PassOutput


class OnnxValidateConfig(PassConfig):
    min_opset: int = Field(
        7,
        description="oldest default-domain opset accepted; below 13 OnnxOpsetUpgrade "
        "converts it (per-channel QDQ needs 13)",
    )


class OnnxValidate(Pass):
    name = "OnnxValidate"
    Config = OnnxValidateConfig

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        import onnx

        try:
            proto = onnx.load(str(model.path), load_external_data=False)
        except Exception as exc:
            raise ModelValidationError(
                f"{model.path} is not a readable ONNX model: {exc}"
            ) from None
        external = external_data_files(proto, model.path.parent)
        try:
            onnx.checker.check_model(str(model.path))
        except onnx.checker.ValidationError as exc:
            first_line = str(exc).strip().splitlines()[0]
            raise ModelValidationError(
                f"{model.path} fails the ONNX checker: {first_line}"
            ) from None
        inputs, outputs, opset = model_signature(model.path)
        if opset < self.config.min_opset:
            raise ModelValidationError(
                f"{model.path} uses opset {opset}; edgepack takes >= {self.config.min_opset} "
                "(and converts those below 13). Re-export with opset 13 or newer."
            )
        if opset > onnx.defs.onnx_opset_version():
            raise ModelValidationError(
                f"{model.path} uses opset {opset}, newer than this onnx supports "
                f"({onnx.defs.onnx_opset_version()}); upgrade onnx and onnxruntime"
            )
        if not inputs or not outputs:
            raise ModelValidationError(f"{model.path} declares no graph inputs or outputs")
        return PassOutput(
            model,
            {"opset": opset, "inputs": inputs, "outputs": outputs, "external_data": external},
        )
