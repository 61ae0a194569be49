"""A user's own metric: ``--metric-plugin module:function`` or an entry point name.

The contract (docs/quantization.md, "Writing a metric plugin")::

    def my_metric(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
                  data: dict[str, np.ndarray]) -> dict:
        return {"degradation": 0.02, "figures": {"exact_match": 0.98}}

``reference`` and ``candidate`` hold every output by name (samples on axis 0), ``data``
the eval file's arrays (the model inputs, and ``labels`` when the file has it). The
degradation is a float in [0, 1] (0: as good as the reference); ``figures`` (optional)
maps names to numbers, recorded in the manifest. The plugin is loaded before any work,
so a typo fails at once; whatever goes wrong inside it becomes a PackagerError that
names it.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from importlib import metadata
from numbers import Real
from typing import Any

from ..errors import PackagerError

ENTRY_POINT_GROUP = "edgepack.metrics"

Plugin = Callable[[dict, dict, dict], Any]


def load_plugin(spec: str) -> Plugin:
    """The callable ``spec`` names: ``module:function`` (a dotted attribute path after
    the colon), or the name of an entry point in group ``edgepack.metrics``.

    Raises:
        PackagerError: it cannot be imported or found, or is not callable.
    """
    where = f"metric plugin {spec!r}"
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
        except Exception as exc:  # the user's module: any error in it is theirs to fix
            raise PackagerError(
                f"{where}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); "
                "give module:function importable from this Python (check PYTHONPATH)"
            ) from exc
        for part in attribute.split("."):
            if not hasattr(target, part):
                raise PackagerError(f"{where}: module {module_name!r} has no {attribute!r}")
            target = getattr(target, part)
    else:
        found = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == spec]
        if not found:
            known = sorted({ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)})
            raise PackagerError(
                f"{where}: no entry point of that name in group {ENTRY_POINT_GROUP!r} "
                f"(installed: {', '.join(known) or 'none'}); give module:function instead"
            )
        try:
            target = found[0].load()
        except Exception as exc:
            raise PackagerError(
                f"{where}: entry point {found[0].value!r} failed to load "
                f"({type(exc).__name__}: {exc})"
            ) from exc
    if not callable(target):
        raise PackagerError(f"{where} is a {type(target).__name__}, not a function")
    return target


def run_plugin(
    spec: str,
    plugin: Plugin,
    reference: Mapping[str, Any],
    candidate: Mapping[str, Any],
    data: Mapping[str, Any],
) -> tuple[float, dict[str, float]]:
    """Call the plugin and check what it returns: (degradation, figures).

    Raises:
        PackagerError: the plugin raised, or returned something outside the contract.
    """
    where = f"metric plugin {spec!r}"
    try:
        result = plugin(dict(reference), dict(candidate), dict(data))
    except Exception as exc:
        raise PackagerError(f"{where} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, Mapping) or "degradation" not in result:
        raise PackagerError(
            f"{where} returned {type(result).__name__}; it must return a dict with "
            "'degradation' (a float in [0, 1]) and optionally 'figures' (name -> number)"
        )
    unknown = sorted(set(result) - {"degradation", "figures"})
    if unknown:
        raise PackagerError(
            f"{where} returned unknown keys {unknown}; the keys are 'degradation', 'figures'"
        )
    degradation = _number(result["degradation"], f"{where}: 'degradation'")
    if not 0 <= degradation <= 1:
        raise PackagerError(f"{where}: 'degradation' is {degradation}, outside [0, 1]")
    figures = result.get("figures") or {}
    if not isinstance(figures, Mapping):
        raise PackagerError(f"{where}: 'figures' must be a dict of name -> number")
    checked = {str(k): _number(v, f"{where}: figure {k!r}") for k, v in figures.items()}
    return degradation, checked


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise PackagerError(f"{what} must be a finite number, got {value!r}")
    return float(value)
