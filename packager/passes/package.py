"""Package: manifest, self-test vectors, signature, deterministic archive."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from pydantic import Field

from edge_runtime.bundle import sha256_file
from edge_runtime.manifest import (
    SCHEMA_VERSION,
    BackendSpec,
    FeedingSpec,
    FileEntry,
    FileRole,
    LlmSpec,
    Manifest,
    Measurements,
    MemoryFit,
    ModelSpec,
    QuantizationRecord,
    SelfTestSpec,
    StepRecord,
    Target,
    TensorSpec,
    TokenSelfTestSpec,
    WheelhouseSpec,
)
from edge_runtime.selftest import INPUT_PREFIX, REFERENCE_PREFIX

from ..bundle_writer import write_bundle
from ..data import save_npz_deterministic, step_rows
from ..formats import formats, get_format
from ..keys import load_private_key
from .base import ModelArtifact, Pass, PassConfig, PassContext, PassOutput
from .evaluate import reference_outputs

SELFTEST_MEMBER = "selftest/vectors.npz"
_BUNDLE_NAMESPACE = uuid.UUID("6f1d2c52-7f0e-4d0a-9a43-5e0b7d1c2a10")


@dataclass(frozen=True)
class PackageRequest:
    """Everything the build learned that goes into the manifest."""

    output: Path
    key: Path
    name: str
    version: str
    created_epoch: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int | None
    recipe: str
    chosen_metrics: dict[str, float]
    quantization: QuantizationRecord
    memory: MemoryFit
    measurements: Measurements | None
    tools: dict[str, str]
    backend: BackendSpec
    # Language models record greedy tokens; other models get self-test vectors.
    selftest: TokenSelfTestSpec | None = None
    llm: LlmSpec | None = None
    wheelhouse: WheelhouseSpec | None = None
    signature: str | None = None  # TFLite: the signature the inputs and outputs come from
    steps: list[StepRecord] = field(default_factory=list)  # the passes behind the model
    # sha256 of files already hashed for the step records, by path (hashed once only)
    digests: dict[Path, str] = field(default_factory=dict)
    feeding: FeedingSpec | None = None  # constant inputs, batch axes, carried state


def _round_up(value: float, digits: int = 3) -> float:
    if value <= 0:
        return value
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    # round() first, so float noise (0.04000000000000036) does not bump the last digit
    return math.ceil(round(value * scale, 6)) / scale


def selftest_tolerance(metrics: dict[str, float]) -> tuple[float, float]:
    """Tolerances for the device self-test, from what the eval data showed on the host.

    Twice the worst error seen on the eval set leaves room for other CPUs' kernels
    (e.g. ARM int8 paths) without letting a broken runtime pass. A floor relative to
    the output scale covers fp32 recipes, whose host error is ~0.
    """
    floor = 1e-4 * max(1.0, metrics["reference_max_abs"])
    atol = _round_up(max(2 * metrics["max_abs_error"], floor))
    min_cosine = 1.0 - _round_up(max(2 * (1.0 - metrics["cosine_min"]), 1e-5))
    return atol, round(min_cosine, 9)


class PackageConfig(PassConfig):
    selftest_vectors: int = Field(
        4, ge=1, le=64, description="eval samples kept as self-test vectors"
    )


class Package(Pass):
    """Writes the signed ``.edgepkg`` for the chosen model, as ``request`` describes it."""

    name = "Package"
    Config = PackageConfig
    input_formats = frozenset(formats())

    def _run(  # type: ignore[override]
        self, model: ModelArtifact, out_dir: Path, ctx: PassContext, request: PackageRequest
    ) -> PassOutput:
        signing_key = load_private_key(request.key)
        model_member = get_format(model.format).member
        sources = {model_member: model.path}
        roles = {model_member: FileRole.MODEL}
        selftest = request.selftest
        if selftest is None:
            sources[SELFTEST_MEMBER], count = self._write_vectors(out_dir, ctx)
            roles[SELFTEST_MEMBER] = FileRole.SELFTEST
        files = [
            FileEntry(
                path=name,
                sha256=request.digests.get(path) or sha256_file(path),
                size=path.stat().st_size,
                role=roles[name],
            )
            for name, path in sorted(sources.items())
        ]
        profile = ctx.profile
        model_digest = next(entry.sha256 for entry in files if entry.path == model_member)
        if selftest is None:
            atol, min_cosine = selftest_tolerance(request.chosen_metrics)
            selftest = SelfTestSpec(
                path=SELFTEST_MEMBER, count=count, atol=atol, min_cosine=min_cosine
            )
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            bundle_id=str(
                uuid.uuid5(
                    _BUNDLE_NAMESPACE,
                    f"{request.name}\0{request.version}\0{profile.name}\0{model_digest}",
                )
            ),
            name=request.name,
            version=request.version,
            created=datetime.fromtimestamp(request.created_epoch, timezone.utc)
            .isoformat()
            .replace("+00:00", "Z"),
            target=Target(
                profile=profile.name,
                arch=profile.arch.value,
                accelerator=profile.accelerator.value,
                platform_tag=profile.python.platform_tag,
            ),
            backend=request.backend,
            model=ModelSpec(
                path=model_member,
                format=model.format,
                opset=request.opset,
                precision=model.precision,
                recipe=request.recipe,
                signature=request.signature,
            ),
            files=files,
            inputs=request.inputs,
            outputs=request.outputs,
            quantization=request.quantization,
            memory=request.memory,
            measurements=request.measurements,
            selftest=selftest,
            tools=request.tools,
            llm=request.llm,
            wheelhouse=request.wheelhouse,
            steps=request.steps,
            feeding=request.feeding,
        )
        manifest_bytes = manifest.to_bytes()
        signature = signing_key.sign(manifest_bytes)
        write_bundle(request.output, manifest_bytes, signature, sources, request.created_epoch)
        return PassOutput(
            ModelArtifact(request.output, "edgepkg", model.precision), {"manifest": manifest}
        )

    def _write_vectors(self, out_dir: Path, ctx: PassContext) -> tuple[Path, int]:
        """Self-test vectors: the first eval feeds (a stateful model's first steps, state
        included; constants left to the runtime), stored samples first, and the fp32
        model's outputs on them; and how many there are."""
        dataset = ctx.eval_sets[0]
        if dataset.feeder.plain:
            count = min(self.config.selftest_vectors, dataset.samples)
            inputs = {name: value[:count] for name, value in dataset.arrays.items()}
            references = {name: value[:count] for name, value in reference_outputs(ctx).items()}
        else:
            inputs, references = step_rows(dataset, ctx.source_run(), self.config.selftest_vectors)
            count = len(next(iter(references.values())))
        vectors = {f"{INPUT_PREFIX}{k}": v for k, v in inputs.items()}
        for name, value in references.items():
            vectors[f"{REFERENCE_PREFIX}{name}"] = np.ascontiguousarray(value)
        vectors_path = out_dir / "vectors.npz"
        save_npz_deterministic(vectors_path, vectors)
        return vectors_path, count
