"""Device profiles: YAML files validated by one typed model that rejects unknown keys."""

from __future__ import annotations

from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from edge_runtime.manifest import ServingSpec
from edge_runtime.settings import describe_validation_error

from .errors import ProfileError
from .formats import formats, get_format


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Arch(str, Enum):
    ARM64 = "arm64"
    X86_64 = "x86_64"


class Accelerator(str, Enum):
    NONE = "none"
    CUDA = "cuda"


class PythonTargetConfig(StrictConfig):
    platform_tag: str = Field(description="wheel platform tag, e.g. manylinux_2_28_aarch64")
    python_version: str = Field(description="CPython version on the device, e.g. 3.11")


class ServingConfig(StrictConfig):
    """How ``edge-runtime serve`` batches tensor models on this device; copied into each
    bundle's manifest (``serving``) and overridable there by the serve flags."""

    max_batch_size: int = Field(
        1,
        ge=1,
        le=1024,
        description="most concurrent requests stacked into one run, for models whose first "
        "axis is free; 1 turns dynamic batching off",
    )
    max_queue_delay_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="longest the first request of a batch waits for others to join it",
    )

    def spec(self) -> ServingSpec:
        return ServingSpec(
            max_batch_size=self.max_batch_size, max_queue_delay_ms=self.max_queue_delay_ms
        )


class _DeviceFacts(StrictConfig):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="profile name (kebab-case)")
    description: str = Field(description="the device in words")
    arch: Arch = Field(description="CPU architecture")
    cpu: str = Field(description="CPU model")
    cores: int = Field(gt=0, description="CPU cores")
    ram_mb: int = Field(gt=0, description="total RAM")
    model_memory_budget_mb: int = Field(gt=0, description="RAM the model may use at run time")
    accelerator: Accelerator = Field(description="inference accelerator, or none")


def _format_sections() -> dict[str, Any]:
    """One section per model format, declared by the format (``packager.formats``)."""
    sections: dict[str, Any] = {}
    for name, pipeline in formats().items():
        section = pipeline.profile_section
        default = Field(default_factory=section) if section.optional else ...
        sections[name] = (section, default)
    return sections


# The device facts, a section per model format (onnx, gguf, tflite, ...), serving, python.
DeviceProfile = create_model(
    "DeviceProfile",
    __base__=_DeviceFacts,
    __module__=__name__,
    **_format_sections(),
    serving=(ServingConfig, Field(default_factory=ServingConfig)),
    python=(PythonTargetConfig, ...),
)
DeviceProfile.__doc__ = (
    "One device: its facts, a section per model format, how it serves, its Python."
)
OnnxTargetConfig = get_format("onnx").profile_section
GgufTargetConfig = get_format("gguf").profile_section
TfliteTargetConfig = get_format("tflite").profile_section


def _shipped_dir():
    return resources.files("device_profiles")


def shipped_profile_names() -> list[str]:
    return sorted(
        entry.name.removesuffix(".yaml")
        for entry in _shipped_dir().iterdir()
        if entry.name.endswith(".yaml")
    )


def parse_profile(text: str, source: str) -> DeviceProfile:
    """Parse YAML text into a DeviceProfile; errors name the key and the file."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a profile must be a YAML mapping")
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as exc:
        problems = describe_validation_error(exc)
        raise ProfileError(f"{source}: invalid profile: {problems}") from None


def load_profile(name: str | None = None, path: Path | None = None) -> DeviceProfile:
    """Load a shipped profile by name, or a user's own profile file.

    Raises:
        ProfileError: unknown name, missing file, or invalid content.
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"profile file {path} does not exist")
        return parse_profile(path.read_text(encoding="utf-8"), str(path))
    if not name:
        raise ProfileError("no profile given: use --profile NAME or --profile-file PATH")
    known = shipped_profile_names()
    if name not in known:
        raise ProfileError(
            f"profile {name!r} not found; known profiles: {', '.join(known)} "
            "(see `edgepack profiles list`, or pass your own with --profile-file)"
        )
    entry = _shipped_dir() / f"{name}.yaml"
    profile = parse_profile(entry.read_text(encoding="utf-8"), f"device_profiles/{name}.yaml")
    if profile.name != name:
        raise ProfileError(f"device_profiles/{name}.yaml declares name {profile.name!r}")
    return profile


def load_all_profiles() -> list[DeviceProfile]:
    return [load_profile(name) for name in shipped_profile_names()]
