"""TFLite (LiteRT) models: quantized with ai-edge-quantizer, run by LiteRT with XNNPACK."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from edge_runtime.cpus import usable_cpus
from edge_runtime.manifest import TfliteBackendSpec

from .base import DeviceRuntime, ProfileSection, Recipe, Step, check_names, recipes_by_name
from .tensors import tensor_bench, tensor_format

if TYPE_CHECKING:  # the engine loads when a session is made, not with the profiles
    from edge_runtime.backends.tflite import TfliteSession

# Before an int8 recipe, float16 weights (DEQUANTIZE-fed constants) are folded back to
# float32 and checked against the source; a float32 source leaves no record of it.
_FLOAT32_WEIGHTS = Step("TfliteDequantizeFp16", only_if_changed=True)

RECIPES = recipes_by_name(
    Recipe(
        "int8-static",
        "int8 weights and activations, ranges calibrated on --calibration data "
        "(ai-edge-quantizer); float inputs and outputs",
        (
            _FLOAT32_WEIGHTS,
            # Standalone RELUs would split XNNPACK's int8 graph (see the pass).
            Step("TfliteFuseActivations", only_if_changed=True),
            Step("TfliteQuantize", {"mode": "int8-static"}),
        ),
        needs_calibration=True,
    ),
    Recipe(
        "int8-dynamic",
        "int8 per-channel weights, activations quantized at run time (ai-edge-quantizer)",
        (_FLOAT32_WEIGHTS, Step("TfliteQuantize", {"mode": "int8-dynamic"})),
    ),
    Recipe(
        "fp16",
        "float16 weights, dequantized to float32 when the model loads (ai-edge-quantizer)",
        (Step("TfliteQuantize", {"mode": "fp16"}),),
    ),
    # Also the end of the chain for a source that is already quantized.
    Recipe("as-is", "the source model as it is, not quantized by edgepack"),
)


class TfliteTargetConfig(ProfileSection):
    optional = True  # profiles written before TFLite support still load

    threads: int = Field(0, ge=0, description="interpreter threads; 0 lets LiteRT decide")
    xnnpack: bool = Field(
        True,
        description="apply the XNNPACK CPU delegate (LiteRT's fast float and int8 kernels); "
        "turn off only to work around a delegate bug",
    )
    recipes: list[str] = Field(
        default_factory=lambda: ["int8-static", "int8-dynamic", "fp16", "as-is"],
        min_length=1,
        description="TFLite quantization recipes to try, most compressed first",
    )

    @field_validator("recipes")
    @classmethod
    def _known_recipes(cls, names: list[str]) -> list[str]:
        return check_names(names, RECIPES, "tflite recipe")


def backend_spec(profile) -> TfliteBackendSpec:
    return TfliteBackendSpec(
        intra_op_threads=profile.tflite.threads, xnnpack=profile.tflite.xnnpack
    )


def host_session(
    path: Path, threads: int | None = None, backend: TfliteBackendSpec | None = None
) -> TfliteSession:
    """The model on this host (every core unless ``threads`` is given), XNNPACK on unless
    ``backend`` (the profile's spec, for the speed check) turns it off."""
    from edge_runtime.backends.tflite import TfliteSession

    xnnpack = backend.xnnpack if backend is not None else True
    return TfliteSession(path, threads or usable_cpus().count, xnnpack)


def reference_kernels(path: Path) -> TfliteSession:
    """The model on LiteRT's built-in kernels, XNNPACK off (the self-test's second path)."""
    from edge_runtime.backends.tflite import TfliteSession

    return TfliteSession(path, usable_cpus().count, False)


def signature(path: Path) -> tuple[list, list]:
    """Inputs and outputs, as TfliteValidate reads them."""
    session = host_session(path, 1)
    return session.input_specs(), session.output_specs()


def weight_counts(path: Path) -> dict[str, int]:
    """Constant tensors (those with data in a buffer) by type, from the flatbuffer."""
    from edge_runtime.tflite_file import check_tflite

    return dict(check_tflite(path).weight_types)


def measure_loader(request: dict):
    """In the measuring worker: load as the device will (the bundle's backend spec)."""
    from edge_runtime.backends.tflite import TfliteSession

    spec = TfliteBackendSpec.model_validate(request["backend"])
    session = TfliteSession(Path(request["model"]), request["threads"], spec.xnnpack)
    return tensor_bench(session.run, request)


def _validated(facts: dict, precision: str) -> str:
    operators = facts["facts"].operators
    return f"validate: {facts['interpreter']}, {operators} operators, {precision} weights"


def _refusal(limit: float) -> tuple[str, str]:
    """The shared gate's words, with TFLite's way out: as-is (there is no fp32 recipe)."""
    failed, _ = _PIPELINE.gate.refusal(limit)
    return (
        failed,
        "A skipped recipe says why it did not apply. Raise the threshold (or one output's: "
        "--metric OUTPUT=NAME:max=V), pick a metric that fits the output (--task, --metric; "
        "docs/quantization.md), check the eval data, or bundle the model unquantized: "
        "--recipe as-is, or as-is at the end of the profile's tflite recipes.",
    )


_PIPELINE = tensor_format(
    name="tflite",
    rank=2,  # profiles list onnx, gguf, tflite
    noun="a TFLite",
    suffixes=(".tflite",),
    engine="tflite",
    device=DeviceRuntime(
        extra="tflite",
        engine_package="ai_edge_litert",
        hidden_imports=("ai_edge_litert.interpreter",),
        metadata=("ai-edge-litert",),  # `info` shows the interpreter's version
    ),
    profile_section=TfliteTargetConfig,
    recipes=RECIPES,
    prepare=(
        Step(
            "TfliteValidate",
            announce=lambda p: "validate: flatbuffer structure, interpreter load, signature",
            report=_validated,
        ),
        # A signature for a model without one; operator codes where the quantizer reads them.
        Step("TfliteNormalize", only_if_changed=True),
    ),
    backend_spec=backend_spec,
    tool_distributions=("edgepack", "ai-edge-litert", "ai-edge-quantizer", "numpy"),
    host_session=host_session,
    kernel_check=reference_kernels,
    signature=signature,
    weight_counts=weight_counts,
    worker_loader="packager.formats.tflite:measure_loader",
)

# TFLite has no "fp32" recipe: the way out of a refusal is as-is.
PIPELINE = dataclasses.replace(
    _PIPELINE, gate=dataclasses.replace(_PIPELINE.gate, refusal=_refusal)
)
