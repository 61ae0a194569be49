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


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in [
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
    ]
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise PackagerError(
            f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}"
        ) from None


def resolve_chain(profile: DeviceProfile, forced: str | None, model_format: str) -> list[Recipe]:
    """The recipes to try, checked against the profile before anything runs.

    Raises:
        PackagerError: an unknown recipe name.
        IncompatiblePassError: a recipe's pass cannot serve the profile.
    """
    names = [forced] if forced else list(profile.onnx.recipes)
    chain = [get_recipe(name) for name in names]
    for recipe in chain:
        for pass_name, config in recipe.passes:
            pass_class = get_pass(pass_name)
            pass_class.check_compatible(profile, model_format)
            pass_class(config)  # validates the config now, not halfway through the build
    return chain
