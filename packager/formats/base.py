"""The contract every model format fills in: one ``FormatPipeline``, declared as data.

This module sits low in the import graph: it imports nothing of the packager above
``errors``, so the profile schema can collect each format's section and recipe names
without a cycle. Passes are named, not imported (``Step.pass_name``); the engine,
``packager.pipeline``, resolves the names through the pass registry and runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from ..errors import PackagerError

# The build's settings (``packager.settings.BuildConfig``) and the device profile
# (``packager.profiles.DeviceProfile``) live above this layer; functions declared here
# receive them as arguments.
BuildSettings = Any
Profile = Any
Facts = dict[str, Any]


class ProfileSection(BaseModel):
    """Base of a format's section in a device profile: unknown keys are errors.

    ``chain_field`` names the list of recipe names to try, in order; a section with
    ``optional`` set may be left out (profiles written before the format still load).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    chain_field: ClassVar[str] = "recipes"
    optional: ClassVar[bool] = False


@dataclass(frozen=True)
class Step:
    """One registered pass, by name, with its config.

    ``options`` adds what depends on the build (a command-line flag, the profile), so a
    recipe stays plain data. ``announce`` is the progress line printed before the pass;
    ``report`` the one after it, from the pass's figures. A step ``only_if_changed`` is
    kept in the manifest's history only when it wrote a new model (a conversion that
    found nothing to convert is left out).
    """

    pass_name: str
    config: Mapping[str, Any] = field(default_factory=dict)
    options: Callable[[BuildSettings, Profile], Mapping[str, Any]] | None = None
    announce: Callable[[Profile], str] | None = None
    report: Callable[[Facts, str], str] | None = None
    only_if_changed: bool = False

    def resolve(self, settings: BuildSettings, profile: Profile) -> dict[str, Any]:
        extra = self.options(settings, profile) if self.options else {}
        return {**self.config, **extra}


@dataclass(frozen=True)
class Recipe:
    """A named chain of passes that turns the prepared model into a candidate."""

    name: str
    description: str
    steps: tuple[Step, ...] = ()
    needs_calibration: bool = False

    @property
    def passes(self) -> list[tuple[str, dict[str, Any]]]:
        """(pass name, config) pairs, for readers that want the recipe as a table."""
        return [(step.pass_name, dict(step.config)) for step in self.steps]


def recipes_by_name(*recipes: Recipe) -> dict[str, Recipe]:
    return {recipe.name: recipe for recipe in recipes}


@dataclass(frozen=True)
class Gate:
    """How a candidate is judged: the evaluating pass and the words around its verdict.

    The evaluating pass reports ``degradation`` and ``passed`` among its figures.
    """

    step: Step
    threshold: Callable[[BuildSettings], float]
    metric: Callable[[str], str]  # the gate's figure in words, from the task
    evaluating: Callable[[str, Any], str]  # progress line: (recipe name, pass context)
    verdict: Callable[[str, Facts, bool], str]  # progress line after the gate
    reason: Callable[[Facts, float], str]  # why a candidate failed, for the attempts table
    refusal: Callable[[float], tuple[str, str]]  # GateError: (what failed, how to fix it)
    eval_samples: Callable[[Facts, Any], int]  # (chosen figures, pass context)


@dataclass(frozen=True)
class DataNeeds:
    """What evaluation (and calibration) data a format takes.

    ``check`` runs before any work and refuses missing or wrong files; ``load`` fills the
    pass context once the model is prepared (it may need the model's inputs).
    """

    check: Callable[[Any, BuildSettings], None]  # (the pipeline, settings)
    load: Callable[[BuildSettings, Facts, Any], None]  # (settings, prepared facts, context)


@dataclass(frozen=True)
class Measure:
    """The host measurement: a pass, the manifest model its figures fill, and the
    ``module:function`` the measuring worker calls to load the model in a fresh process.
    """

    step: Step
    figures: type[BaseModel]
    worker_loader: str
    announce: str


# Weight tensor types by the precision they hold; the census counts only these.
PRECISION_TYPES = {
    "int8": ("int8", "uint8", "int4", "uint4"),
    "fp16": ("float16", "bfloat16"),
    "fp32": ("float32",),
}


@dataclass(frozen=True)
class WeightCensus:
    """The weight tensors of a model file, counted by element type (``float32``,
    ``float16``, ``int8``, ...): what the file holds, whatever a recipe is called."""

    counts: Mapping[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.get(t, 0) for types in PRECISION_TYPES.values() for t in types)

    def count(self, precision: str) -> int:
        """How many weight tensors hold ``precision`` (int8 counts uint8 and int4 too)."""
        return sum(self.counts.get(t, 0) for t in PRECISION_TYPES[precision])

    @property
    def precision(self) -> str:
        """The manifest's precision: int8 if any weight is, else fp16 if any is, else fp32."""
        return next((p for p in ("int8", "fp16") if self.count(p)), "fp32")

    def describe(self, precision: str) -> str:
        """e.g. "0 of 385 weight tensors are int8"."""
        return f"{self.count(precision)} of {self.total} weight tensors are {precision}"


@dataclass(frozen=True)
class DeviceRuntime:
    """What a device installs, and a frozen runtime carries, to run the format.

    The requirements themselves are not repeated here: the offline wheelhouse reads them
    from edgepack's own metadata (pyproject.toml's extra named ``extra``).
    """

    extra: str  # the pyproject extra: pip install 'edgepack[EXTRA]'
    engine_package: str  # the engine's import name, kept in or excluded from a freeze
    hidden_imports: tuple[str, ...] = ()  # engine modules imported by name at run time
    collect_all: bool = False  # the engine loads native files PyInstaller's scan misses
    metadata: tuple[str, ...] = ()  # distributions whose metadata the runtime reads


@dataclass(frozen=True)
class FormatPipeline:
    """Everything the engine needs to know about one model format."""

    name: str  # also ModelSpec.format and the key of the profile section
    noun: str  # "an ONNX", for messages
    suffixes: tuple[str, ...]  # the first one names the bundle member, model/model.SUFFIX
    engine: str  # the edge_runtime backend that runs it
    device: DeviceRuntime  # what a device installs (and a freeze keeps) for that backend
    profile_section: type[ProfileSection]
    recipes: Mapping[str, Recipe]
    prepare: tuple[Step, ...]
    data: DataNeeds
    gate: Gate
    measure: Measure
    fit: Callable[[Profile, Path, BaseModel | None, Facts], Any]  # -> MemoryFit
    backend_spec: Callable[[Profile], BaseModel]
    # Manifest sections beyond the common ones (e.g. the llm section, a token self-test):
    # (chosen, prepared facts, settings, profile, progress) -> PackageRequest fields.
    extra_manifest: Callable[[Chosen, Facts, BuildSettings, Profile, Callable], dict[str, Any]]
    tool_distributions: tuple[str, ...]
    # Opens the model on this host for the evaluate pass: path -> object with ``run``.
    host_session: Callable[[Path], Any] | None = None
    # Opens it through a second kernel path of the same engine (ONNX: exact integer sums;
    # LiteRT without XNNPACK): outputs it moves beyond the margin are kept as the self-test's
    # alternate reference (packager/passes/selftest_vectors.py).
    kernel_check: Callable[[Path], Any] | None = None
    # The model's inputs and outputs (TensorSpecs), read cheaply before any work, so the
    # build's per-input flags (--batch-axis, --constant, --state) are checked up front.
    signature: Callable[[Path], tuple[list[Any], list[Any]]] | None = None
    # Counts a model file's weight tensors by type: a quantizing recipe must have raised
    # the count of its precision, and the manifest's precision is read from the file.
    weights: Callable[[Path], WeightCensus] | None = None
    # The progress line before a recipe's passes; default "NAME: DESCRIPTION".
    announce_recipe: Callable[[Recipe], str] | None = None
    # The message for an unknown recipe name; default "unknown FORMAT recipe ...".
    unknown_recipe: Callable[[str], str] | None = None
    package_announce: str = "package: manifest, self-test vectors, signature"
    # The build setting that forces one recipe instead of the profile's chain.
    forced_by: str = "recipe"
    # Where the format comes in listings (e.g. the sections of a profile); then by name.
    rank: int = 100

    @property
    def member(self) -> str:
        """The model's path inside the bundle."""
        return f"model/model{self.suffixes[0]}"

    def chain(self, profile: Profile) -> list[str]:
        """The recipe names the profile lists for this format, in order."""
        return list(getattr(getattr(profile, self.name), self.profile_section.chain_field))

    def recipe(self, name: str) -> Recipe:
        """The recipe ``name``; PackagerError naming the known ones otherwise."""
        if name in self.recipes:
            return self.recipes[name]
        if self.unknown_recipe is not None:
            raise PackagerError(self.unknown_recipe(name))
        raise PackagerError(
            f"unknown {self.name} recipe {name!r}; known {self.name} recipes: "
            f"{', '.join(self.recipes)}"
        )

    def announce(self, recipe: Recipe) -> str:
        if self.announce_recipe is not None:
            return self.announce_recipe(recipe)
        return f"{recipe.name}: {recipe.description}"


@dataclass(frozen=True)
class Chosen:
    """The candidate that passed the gate."""

    path: Path
    recipe: str
    precision: str
    metrics: Facts


def check_names(names: list[str], known: Mapping[str, Any], what: str) -> list[str]:
    """For profile validators: ValueError (so pydantic names the key) on an unknown name."""
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {what} {name!r}; known: {', '.join(known)}")
    return names
