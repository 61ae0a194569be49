"""Package: manifest, self-test vectors, signature, deterministic archive."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

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
    ServingSpec,
    StepRecord,
    Target,
    TensorSpec,
    TextSpec,
    TokenSelfTestSpec,
    WheelhouseSpec,
)

from ..bundle_writer import write_bundle
from ..formats import formats, get_format
from ..keys import load_private_key
from .base import PROGRAMMING_ERRORS, ModelArtifact, Pass, PassConfig, PassContext, PassOutput
from .selftest_vectors import choose_vectors, margin_for, write_vectors

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
    serving: ServingSpec | None = None  # the profile's dynamic batching for serve
    text: TextSpec | None = None  # text in: the tokenizer (among extra_files) and the task
    extra_files: dict[str, Path] = field(default_factory=dict)  # member -> source file


class PackageConfig(PassConfig):
    selftest_vectors: int | None = Field(
        None,
        ge=1,
        description="eval samples kept as self-test vectors (None: as many as fit the "
        "budget, 10% of the model or 1 MiB, at most 8)",
    )


def package_options(settings, profile) -> dict[str, Any]:
    """The Package pass's config from the build settings (``--selftest-vectors``)."""
    return {"selftest_vectors": settings.selftest_vectors}


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
            selftest, sources[SELFTEST_MEMBER] = self._write_vectors(model, out_dir, ctx)
            roles[SELFTEST_MEMBER] = FileRole.SELFTEST
        for member, path in request.extra_files.items():
            sources[member], roles[member] = path, FileRole.EXTRA
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
            serving=request.serving,
            text=request.text,
        )
        manifest_bytes = manifest.to_bytes()
        signature = signing_key.sign(manifest_bytes)
        write_bundle(request.output, manifest_bytes, signature, sources, request.created_epoch)
        return PassOutput(
            ModelArtifact(request.output, "edgepkg", model.precision), {"manifest": manifest}
        )

    def _write_vectors(
        self, model: ModelArtifact, out_dir: Path, ctx: PassContext
    ) -> tuple[SelfTestSpec, Path]:
        """Self-test vectors: eval feeds (of the first eval file) and the bundled model's
        outputs on them on this host, with a bound per output."""
        pipeline = get_format(model.format)
        dataset = ctx.eval_sets[0]
        choice = choose_vectors(
            dataset.feeder,
            dataset.arrays,
            pipeline.host_session(model.path).run,
            model_bytes=model.path.stat().st_size,
            margin=margin_for(model.precision, ctx.profile.accelerator.value),
            requested=self.config.selftest_vectors,
            member=SELFTEST_MEMBER,
            check=_kernel_check(pipeline.kernel_check, model.path, ctx.progress),
        )
        for note in choice.notes:
            ctx.progress(note)
        return choice.spec, write_vectors(out_dir / "vectors.npz", choice)


def _kernel_check(opener, path: Path, progress):
    """The model opened through the format's second kernel path, its ``run``; None, with
    a note, when the engine cannot open it that way (the margins alone bound it then)."""
    if opener is None:
        return None
    try:
        return opener(path).run
    except PROGRAMMING_ERRORS:
        raise
    except Exception as exc:  # the engine's own refusal: the margins still apply
        progress(f"self-test: no second kernel path for the bounds ({exc})"[:300])
        return None
