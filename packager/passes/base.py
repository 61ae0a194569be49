"""The Pass contract: one registered class per packager step, with a declared config.

The base ``run`` owns the bookkeeping (output folder, timing, hashing, the record); a
subclass implements only ``_run``, the transformation itself. What a pass supports is
declared as data (``input_formats``, ``supported_providers``), so an impossible
profile/pass pair is refused before anything runs.
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
    """Shared state of one build: the work folder, profile, data and progress hook."""

    workdir: Path
    profile: DeviceProfile
    calibration: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    labels: Any = None
    task: str = "generic"
    progress: Callable[[str], None] = lambda message: None
    cache: dict[str, Any] = field(default_factory=dict)
    _counter: int = 0

    def new_step_dir(self, name: str) -> Path:
        self._counter += 1
        path = self.workdir / f"{self._counter:02d}-{name}"
        path.mkdir(parents=True, exist_ok=False)
        return path


@dataclass(frozen=True)
class PassRecord:
    name: str
    config: dict[str, Any]
    seconds: float
    output_sha256: str | None


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

    def run(self, model: ModelArtifact, ctx: PassContext) -> tuple[PassOutput, PassRecord]:
        out_dir = ctx.new_step_dir(self.name)
        started = time.perf_counter()
        try:
            output = self._run(model, out_dir, ctx)
        except PackagerError:
            raise
        except PROGRAMMING_ERRORS:
            raise
        except Exception as exc:  # the engine's own failure on this model
            raise PassFailedError(f"{self.name} failed: {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - started
        digest = None
        if output.artifact.path != model.path and output.artifact.path.is_file():
            digest = sha256_file(output.artifact.path)
        record = PassRecord(self.name, self.config.model_dump(mode="json"), seconds, digest)
        return output, record

    @abstractmethod
    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        """Transform or examine ``model``; write any new file under ``out_dir``."""


def get_pass(name: str) -> type[Pass]:
    try:
        return PASSES[name]
    except KeyError:
        raise PackagerError(f"unknown pass {name!r}; known: {', '.join(sorted(PASSES))}") from None
