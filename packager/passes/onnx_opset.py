"""OnnxOpsetUpgrade: convert a model below opset 13 with onnx.version_converter.

The quantizers need opset 13 (per-channel QDQ), and old exporters still write 9 to 12.
The converted model must compute what the original did: both run on the eval data, and
a difference beyond float noise refuses the build instead of shipping a changed model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from ..errors import ModelValidationError
from .base import ModelArtifact, Pass, PassConfig, PassContext, PassOutput
from .evaluate import reference_outputs, run_dataset


class OnnxOpsetUpgradeConfig(PassConfig):
    target_opset: int = Field(
        13, ge=13, description="default-domain opset a model below it is converted to"
    )
    rtol: float = Field(
        1e-4,
        gt=0,
        description="largest difference allowed between the converted and the original "
        "outputs, relative to the largest value of that output (float noise)",
    )


def default_opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def output_drift(
    converted: dict[str, np.ndarray], original: dict[str, np.ndarray], rtol: float
) -> list[str]:
    """The outputs of ``converted`` that differ from ``original`` beyond ``rtol`` times the
    output's largest magnitude, each described in words."""
    drifted = []
    for name, reference in original.items():
        reference = reference.astype(np.float64)
        candidate = converted[name].astype(np.float64)
        scale = float(np.abs(reference).max(initial=0.0))
        difference = (
            float(np.abs(candidate - reference).max(initial=0.0))
            if candidate.shape == reference.shape
            else np.inf
        )
        if not difference <= rtol * max(scale, np.finfo(np.float32).tiny):
            drifted.append(
                f"output {name!r} differs by up to {difference:.3g} (its largest value "
                f"is {scale:.3g})"
            )
    return drifted


class OnnxOpsetUpgrade(Pass):
    """Converts a model below ``target_opset`` and checks it still computes the same."""

    name = "OnnxOpsetUpgrade"
    Config = OnnxOpsetUpgradeConfig
    needs_data = True

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        import onnx
        from onnx import version_converter
        from onnx.external_data_helper import uses_external_data

        target = self.config.target_opset
        header = onnx.load(str(model.path), load_external_data=False)
        opset = default_opset(header)
        if opset >= target:
            return PassOutput(model)
        fix = f"re-export the model with opset >= {target}"
        try:
            converted = version_converter.convert_version(onnx.load(str(model.path)), target)
            onnx.checker.check_model(converted)
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelValidationError(
                f"{model.path.name} uses opset {opset}, and onnx.version_converter could not "
                f"convert it to {target}: {first_line}; {fix}"
            ) from None
        output = out_dir / "model.onnx"
        external = any(uses_external_data(tensor) for tensor in header.graph.initializer)
        onnx.save(
            converted,
            str(output),
            save_as_external_data=external,
            location="model.onnx.data" if external else None,
        )
        drifted = output_drift(
            run_dataset(output, ctx.eval_sets[0]), reference_outputs(ctx), self.config.rtol
        )
        if drifted:
            raise ModelValidationError(
                f"converting {model.path.name} from opset {opset} to {target} changed what it "
                f"computes on the eval data: {'; '.join(drifted)}; {fix}"
            )
        ctx.progress(f"opset: converted {opset} -> {target}, outputs match on the eval data")
        return PassOutput(
            ModelArtifact(output, "onnx", model.precision),
            {"opset": target, "source_opset": opset},
        )
