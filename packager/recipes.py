"""Named quantization recipes: each is a short list of passes with their configs.

Profiles refer to recipes by name, most compressed first; the build tries them in order
until one passes the accuracy gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import PackagerError
from .passes import get_pass
from .profiles import DeviceProfile


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    passes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    needs_calibration: bool = False


def _by_name(*recipes: Recipe) -> dict[str, Recipe]:
    return {recipe.name: recipe for recipe in recipes}


# Recipes per source format; a name means the same intent in each (e.g. fp16 weights).
RECIPES: dict[str, dict[str, Recipe]] = {
    "onnx": _by_name(
        Recipe(
            "int8-static-qdq-per-channel",
            "int8 weights and activations, QDQ, per-channel weight scales, calibrated ranges",
            [("OnnxStaticQuantize", {"per_channel": True})],
            needs_calibration=True,
        ),
        Recipe(
            "int8-dynamic-per-channel",
            "int8 per-channel weights; activations quantized at run time",
            [("OnnxDynamicQuantize", {"per_channel": True})],
        ),
        Recipe(
            "fp16",
            "float16 weights and compute, float32 inputs and outputs",
            [("OnnxToFloat16", {"keep_io_types": True})],
        ),
        Recipe("fp32", "the optimized float32 graph, unquantized"),
    ),
    "tflite": _by_name(
        Recipe(
            "int8-static",
            "int8 weights and activations, ranges calibrated on --calibration data "
            "(ai-edge-quantizer); float inputs and outputs",
            [("TfliteQuantize", {"mode": "int8-static"})],
            needs_calibration=True,
        ),
        Recipe(
            "int8-dynamic",
            "int8 per-channel weights, activations quantized at run time (ai-edge-quantizer)",
            [("TfliteQuantize", {"mode": "int8-dynamic"})],
        ),
        Recipe(
            "fp16",
            "float16 weights, dequantized to float32 when the model loads (ai-edge-quantizer)",
            [("TfliteQuantize", {"mode": "fp16"})],
        ),
        # Also the end of the chain for a source that is already quantized.
        Recipe("as-is", "the source model as it is, not quantized by edgepack"),
    ),
}


def get_recipe(name: str, model_format: str = "onnx") -> Recipe:
    known = RECIPES.get(model_format, {})
    try:
        return known[name]
    except KeyError:
        raise PackagerError(
            f"unknown {model_format} recipe {name!r}; known {model_format} recipes: "
            f"{', '.join(known)}"
        ) from None


def resolve_chain(profile: DeviceProfile, forced: str | None, model_format: str) -> list[Recipe]:
    """The recipes to try, checked against the profile before anything runs.

    Raises:
        PackagerError: an unknown recipe name.
        IncompatiblePassError: a recipe's pass cannot serve the profile.
    """
    listed = profile.tflite.recipes if model_format == "tflite" else profile.onnx.recipes
    names = [forced] if forced else list(listed)
    chain = [get_recipe(name, model_format) for name in names]
    for recipe in chain:
        for pass_name, config in recipe.passes:
            pass_class = get_pass(pass_name)
            pass_class.check_compatible(profile, model_format)
            pass_class(config)  # validates the config now, not halfway through the build
    return chain
