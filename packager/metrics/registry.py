"""The metric registry: each gate metric by name, its options, and the ``--metric`` syntax.

A metric scores one output tensor of a candidate against the fp32 reference on the eval
data: ``score(reference, candidate, context) -> (degradation, figures)``, where the
degradation is 0 for an identical output and 1 for a useless one, and the figures are
what the manifest records beside it (str -> float). Metrics register themselves here by
name (``@register``); the gate resolves names only through ``get_metric``.

``--metric OUTPUT=NAME`` may carry options: ``NAME:KEY=VALUE,KEY=VALUE`` (e.g.
``probs=dense:threshold=0.5``). Every metric takes ``max``, the largest degradation
allowed for that output, over ``--max-degradation`` and the metric's own default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import PackagerError

# The option every metric takes: this output's own threshold.
THRESHOLD_OPTION = "max"


@dataclass(frozen=True)
class MetricContext:
    """What a metric may need beyond the two arrays.

    ``data`` holds the eval inputs by name (masks come from there), ``labels`` the eval
    file's ``labels`` array if it has one, ``options`` the metric's options with every
    default filled in, ``given`` the names of those the user set.
    """

    output: str
    data: Mapping[str, Any] = field(default_factory=dict)
    labels: Any = None
    options: Mapping[str, Any] = field(default_factory=dict)
    given: frozenset[str] = frozenset()  # the options the user set (the rest are defaults)


Score = tuple[float, dict[str, float]]
ScoreFunction = Callable[[Any, Any, MetricContext], Score]


@dataclass(frozen=True)
class Metric:
    """A registered metric: its function, a one-line summary, options with defaults
    (the default's type is the option's type) and, for some, a default threshold that
    replaces ``--max-degradation`` unless that flag is given."""

    name: str
    score: ScoreFunction
    summary: str
    options: Mapping[str, Any] = field(default_factory=dict)
    threshold: float | None = None


METRICS: dict[str, Metric] = {}


def register(
    name: str,
    summary: str,
    options: Mapping[str, Any] | None = None,
    threshold: float | None = None,
) -> Callable[[ScoreFunction], ScoreFunction]:
    """Decorator: register ``function`` as the metric ``name``."""

    def decorate(function: ScoreFunction) -> ScoreFunction:
        if name in METRICS:
            raise RuntimeError(f"two metrics registered as {name!r}")
        METRICS[name] = Metric(name, function, summary, dict(options or {}), threshold)
        return function

    return decorate


def metric_names() -> list[str]:
    return sorted(METRICS)


def get_metric(name: str) -> Metric:
    """The metric ``name``; PackagerError listing the known ones otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        raise PackagerError(
            f"unknown metric {name!r}; known metrics: {', '.join(metric_names())} "
            "(see docs/quantization.md)"
        ) from None


@dataclass(frozen=True)
class MetricSpec:
    """A metric as a user named it: ``NAME`` or ``NAME:KEY=VALUE,...``, parsed and checked."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)  # only those given
    threshold: float | None = None  # the ``max`` option

    @classmethod
    def parse(cls, text: str, where: str) -> MetricSpec:
        """Parse and check ``text``; ``where`` says where it came from, for messages
        (e.g. "--metric boxes=..."). Raises PackagerError for an unknown metric or
        option, or a value of the wrong type."""
        name, _, rest = text.strip().partition(":")
        metric = get_metric(name)
        options: dict[str, Any] = {}
        threshold = None
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            known = [THRESHOLD_OPTION, *metric.options]
            if not sep or key not in known:
                raise PackagerError(
                    f"{where}: metric {name!r} takes options {', '.join(known)} "
                    f"(as {name}:KEY=VALUE,...); got {item!r}"
                )
            if key == THRESHOLD_OPTION:
                threshold = _convert(0.0, value, where, key)
                if not 0 <= threshold <= 1:
                    raise PackagerError(f"{where}: max={value} must be between 0 and 1")
            else:
                options[key] = _convert(metric.options[key], value, where, key)
        return cls(name, options, threshold)

    def resolved_options(self) -> dict[str, Any]:
        """Every option of the metric: the defaults with the given ones over them."""
        return {**get_metric(self.name).options, **self.options}

    def describe(self) -> str:
        """The spec as a user would write it, e.g. "dense:threshold=0.5"."""
        given = [f"{key}={value}" for key, value in self.options.items()]
        if self.threshold is not None:
            given.append(f"{THRESHOLD_OPTION}={self.threshold:g}")
        return self.name + (":" + ",".join(given) if given else "")


KIND_WORDS = {int: "an integer", float: "a number", str: "text"}


def _convert(default: Any, value: str, where: str, key: str) -> Any:
    kind = type(default)
    try:
        return kind(value.strip())
    except ValueError:
        raise PackagerError(
            f"{where}: option {key}={value!r} must be {KIND_WORDS.get(kind, kind.__name__)}"
        ) from None
