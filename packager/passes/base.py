"""The Pass contract: one registered class per packager step, with a declared config.

The base ``run`` owns the bookkeeping (output folder, timing, the record); a subclass
implements only ``_run``, the transformation itself. What a pass supports is declared as
data (``input_formats``, ``supported_providers``), so an impossible profile/pass pair is
refused before anything runs. Records are hashed only when the manifest keeps them
(``PassRecord.step``), so no file is hashed for nothing.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from edge_runtime.bundle import sha256_file
from edge_runtime.manifest import StepRecord

from ..errors import IncompatiblePassError, PackagerError
from ..profiles import DeviceProfile

PASSES: dict[str, type[Pass]] = {}

# Errors that mean a bug in edgepack, not a model the pass could not handle: never
# reported as "pass failed", always raised.
PROGRAMMING_ERRORS = (TypeError, AttributeError, ImportError, NameError, AssertionError)


class PassConfig(BaseModel):
    """Base for pass configs: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PassFailedError(PackagerError):
    """A pass could not transform this model (the recipe is recorded as an error)."""


class RecipeSkippedError(PassFailedError):
    """A pass does not apply to this model (the recipe is recorded as skipped, with why)."""


@dataclass(frozen=True)
class ModelArtifact:
    """A model file on disk and what the pipeline knows about it."""

    path: Path
    format: str
    precision: str = "fp32"


@dataclass
class PassContext:
    """Shared state of one build: the work folder, profile, data and progress hook.

    ``source`` is the model the build started from, which the gates compare against.
    ``reference_outputs`` and ``source_score`` are caches: figures of the source model,
    computed once per build.
    """

    workdir: Path
    profile: DeviceProfile
    source: Path | None = None
    calibration: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    labels: Any = None
    task: str = "generic"
    eval_windows: list[list[int]] | None = None  # GGUF: token windows of the eval text
    progress: Callable[[str], None] = lambda message: None
    reference_outputs: dict[str, Any] | None = None  # tensor models: the source's outputs
    source_score: Any = None  # GGUF: the source's per-token scores
    # Every --eval and --calibration file (packager.data.DataSet), in order; the
    # ``evaluation``/``calibration``/``labels`` fields above are the first file's.
    datasets: dict[str, list[Any]] = field(default_factory=dict)
    # Set by the engine during the recipe loop: runs the build's gate on a candidate and
    # returns its figures ("passed", "degradation", ...), so a searching pass (mixed
    # precision) can judge its intermediate candidates the way the build will.
    judge: Callable[[ModelArtifact], dict[str, Any]] | None = None
    _counter: int = 0

    def use_data(self, eval_sets: list[Any], calibration_sets: list[Any]) -> None:
        """Keep the build's data files; the first of each kind is also ``evaluation``
        (with ``labels``) and ``calibration``, for code that reads one file."""
        self.datasets = {"eval": list(eval_sets), "calibration": list(calibration_sets)}
        first = eval_sets[0] if eval_sets else None
        self.evaluation = first.arrays if first else None
        self.labels = first.labels if first else None
        self.calibration = calibration_sets[0].arrays if calibration_sets else None

    @property
    def eval_sets(self) -> list[Any]:
        """Every eval file as a ``packager.data.DataSet`` (``.path``, ``.arrays``,
        ``.labels``, ``.feeds()``, ``.run(run)``). A context given only ``evaluation``
        arrays (older callers, tests) has them as one set fed as they are."""
        return self._sets("eval", self.evaluation, self.labels)

    @property
    def calibration_sets(self) -> list[Any]:
        """Every calibration file as a ``packager.data.DataSet``; see ``eval_sets``."""
        return self._sets("calibration", self.calibration, None)

    def _sets(self, kind: str, arrays: Any, labels: Any) -> list[Any]:
        if arrays is None:
            return []
        sets = self.datasets.get(kind) or []
        if sets and sets[0].arrays is arrays:
            return sets
        from ..data import plain_dataset

        self.datasets[kind] = [plain_dataset(arrays, labels)]
        return self.datasets[kind]

    def source_run(self) -> Callable[[dict], Any]:
        """Run the source model on this host (e.g. to carry a stateful model's state
        while calibrating)."""
        from ..formats import detect_format

        return detect_format(self.source).host_session(self.source).run

    def calibration_feeds(self, limit: int | None = None) -> list[dict]:
        """Batch-of-one feeds for calibrating, from every --calibration file, at most
        ``limit`` samples in all: batch axes and constants applied, and a stateful model's
        state carried step by step by the source model."""
        from ..data import calibration_feeds

        sets = self.calibration_sets
        sequential = any(dataset.feeder.sequential for dataset in sets)
        return calibration_feeds(sets, limit, self.source_run() if sequential else None)

    def new_step_dir(self, name: str) -> Path:
        self._counter += 1
        path = self.workdir / f"{self._counter:02d}-{name}"
        path.mkdir(parents=True, exist_ok=False)
        return path


@dataclass(frozen=True)
class PassRecord:
    """What one pass run did: its name, config, time, and the new file it wrote (if any)."""

    name: str
    config: dict[str, Any]
    seconds: float
    output: Path | None

    def step(self, digests: dict[Path, str], timed: bool = True) -> StepRecord:
        """The manifest's record of this pass; ``digests`` caches hashes by path, so a
        file is hashed once (the bundle's file list reuses it). Untimed builds record 0 s,
        so they stay byte-identical."""
        digest = None
        if self.output is not None:
            if self.output not in digests:
                digests[self.output] = sha256_file(self.output)
            digest = digests[self.output]
        seconds = round(self.seconds, 3) if timed else 0.0
        return StepRecord(name=self.name, config=self.config, seconds=seconds, output_sha256=digest)


@dataclass(frozen=True)
class PassOutput:
    artifact: ModelArtifact
    metrics: dict[str, Any] = field(default_factory=dict)


class Pass(ABC):
    """One packager step. Subclasses set ``name``, ``Config`` and implement ``_run``."""

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    input_formats: ClassVar[frozenset[str]] = frozenset({"onnx"})
    # None: runs wherever the format runs. Otherwise the profile must list one of these.
    supported_providers: ClassVar[frozenset[str] | None] = None
    # A prepare pass that reads the eval/calibration data: the engine loads it first.
    needs_data: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in PASSES:
                raise RuntimeError(f"two passes registered as {cls.name!r}")
            PASSES[cls.name] = cls

    def __init__(self, config: PassConfig | Mapping[str, Any] | None = None) -> None:
        if isinstance(config, PassConfig):
            self.config = config
        else:
            try:
                self.config = self.Config.model_validate(dict(config or {}))
            except ValidationError as exc:
                raise PackagerError(f"invalid config for pass {self.name}: {exc}") from None

    @classmethod
    def check_compatible(cls, profile: DeviceProfile, model_format: str) -> None:
        """Raise IncompatiblePassError when this pass cannot serve ``profile``."""
        if model_format not in cls.input_formats:
            raise IncompatiblePassError(
                f"pass {cls.name} takes {sorted(cls.input_formats)} models, not {model_format}"
            )
        if cls.supported_providers is not None:
            providers = set(profile.onnx.providers)
            if not providers & cls.supported_providers:
                raise IncompatiblePassError(
                    f"pass {cls.name} produces a model only {sorted(cls.supported_providers)} "
                    f"can run, but profile {profile.name!r} uses {profile.onnx.providers}; "
                    "pick another --recipe or add a provider to the profile"
                )

    def run(
        self, model: ModelArtifact, ctx: PassContext, **inputs: Any
    ) -> tuple[PassOutput, PassRecord]:
        """Run the pass on ``model``; ``inputs`` are what this pass takes beyond the model."""
        out_dir = ctx.new_step_dir(self.name)
        started = time.perf_counter()
        try:
            output = self._run(model, out_dir, ctx, **inputs)
        except PackagerError:
            raise
        except PROGRAMMING_ERRORS:
            raise
        except Exception as exc:  # the engine's own failure on this model
            raise PassFailedError(f"{self.name} failed: {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - started
        written = output.artifact.path
        new_file = written if written != model.path and written.is_file() else None
        record = PassRecord(self.name, self.config.model_dump(mode="json"), seconds, new_file)
        return output, record

    @abstractmethod
    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        """Transform or examine ``model``; write any new file under ``out_dir``."""


def get_pass(name: str) -> type[Pass]:
    try:
        return PASSES[name]
    except KeyError:
        raise PackagerError(f"unknown pass {name!r}; known: {', '.join(sorted(PASSES))}") from None
