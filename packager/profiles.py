"""Device profiles: YAML files validated by one typed model that rejects unknown keys."""

from __future__ import annotations

from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_runtime.settings import describe_validation_error

from .errors import ProfileError


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Arch(str, Enum):
    ARM64 = "arm64"
    X86_64 = "x86_64"


class Accelerator(str, Enum):
    NONE = "none"
    CUDA = "cuda"


class OnnxTargetConfig(StrictConfig):
    providers: list[str] = Field(
        min_length=1, description="ONNX Runtime execution providers, most preferred first"
    )
    threads: int = Field(ge=0, description="intra-op threads; 0 lets ONNX Runtime decide")
    cpu_mem_arena: bool = Field(
        description="keep ONNX Runtime's CPU memory arena; off on edge devices to save RAM"
    )
    allow_spinning: bool = Field(
        False,
        description="let ONNX Runtime's idle worker threads spin-wait for the next run: a "
        "little lower latency back to back, but cores stay busy between requests, which "
        "costs power and heat on battery or passively cooled devices",
    )
    graph_optimization: Literal["disabled", "basic", "extended"] = Field(
        "basic",
        description="offline ONNX Runtime graph optimization level; 'basic' keeps standard "
        "ONNX ops so the model stays portable to every execution provider",
    )
    recipes: list[str] = Field(
        min_length=1, description="quantization recipes to try, most compressed first"
    )


class GgufTargetConfig(StrictConfig):
    quant_types: list[str] = Field(
        min_length=1,
        description="llama.cpp quantization types to try, most compressed first, e.g. "
        "[Q4_K_M, Q5_K_M, Q8_0]; the perplexity gate falls back along this chain",
    )
    threads: int = Field(0, ge=0, description="llama.cpp threads; 0 = one per core")

    @field_validator("quant_types")
    @classmethod
    def _known_types(cls, names: list[str]) -> list[str]:
        from .passes.gguf import check_quant_type  # lazy: the passes import this module

        return [check_quant_type(name) for name in names]

    gpu_layers: int = Field(0, ge=-1, description="layers to offload to the GPU (-1 = all)")
    context_length: int = Field(2048, gt=0, description="context length the device will use")


class TfliteTargetConfig(StrictConfig):
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
        from .recipes import get_recipe  # lazy: recipes imports the passes, which import this

        for name in names:
            get_recipe(name, "tflite")
        return names


class PythonTargetConfig(StrictConfig):
    platform_tag: str = Field(description="wheel platform tag, e.g. manylinux_2_28_aarch64")
    python_version: str = Field(description="CPython version on the device, e.g. 3.11")


class DeviceProfile(StrictConfig):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="profile name (kebab-case)")
    description: str = Field(description="the device in words")
    arch: Arch = Field(description="CPU architecture")
    cpu: str = Field(description="CPU model")
    cores: int = Field(gt=0, description="CPU cores")
    ram_mb: int = Field(gt=0, description="total RAM")
    model_memory_budget_mb: int = Field(gt=0, description="RAM the model may use at run time")
    accelerator: Accelerator = Field(description="inference accelerator, or none")
    onnx: OnnxTargetConfig
    gguf: GgufTargetConfig
    # Optional, so profiles written before TFLite support still load.
    tflite: TfliteTargetConfig = Field(default_factory=TfliteTargetConfig)
    python: PythonTargetConfig


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
