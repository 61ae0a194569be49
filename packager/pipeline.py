"""The build engine: one loop for every model format.

``build`` resolves and checks everything before any work (the format, the recipe chain,
every pass's name, config and declared capabilities, the data files, the signing key),
then runs the format's pipeline: prepare -> for each recipe in the chain: its passes,
the gate -> measure -> check the memory fit -> package. Every recipe tried is recorded,
and the manifest keeps the passes that produced the chosen model (``Manifest.steps``).
What differs between formats is data in ``packager.formats``; nothing here names one.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from edge_runtime.manifest import Attempt, Manifest, QuantizationRecord

from .errors import GateError, PackagerError
from .formats import detect_format
from .formats.base import Chosen, FormatPipeline, Recipe, Step
from .keys import load_private_key
from .passes import ModelArtifact, Package, Pass, PassContext, get_pass
from .passes.base import PassFailedError, PassRecord, RecipeSkippedError
from .passes.package import PackageRequest
from .settings import BuildConfig

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildResult:
    bundle: Path
    manifest: Manifest
    seconds: float


@dataclass(frozen=True)
class Plan:
    """Everything a build will run, resolved and checked before any work."""

    pipeline: FormatPipeline
    prepare: list[tuple[Step, Pass]]
    chain: list[tuple[Recipe, list[Pass]]]
    gate: Pass
    measure: Pass | None
    package: Pass


def _instantiate(step: Step, settings: BuildConfig, pipeline: FormatPipeline) -> Pass:
    """The pass of ``step`` with its config checked, and its capabilities against the
    profile and format (IncompatiblePassError, PackagerError)."""
    pass_class = get_pass(step.pass_name)
    pass_class.check_compatible(settings.profile, pipeline.name)
    return pass_class(step.resolve(settings, settings.profile))


def plan_build(settings: BuildConfig) -> Plan:
    """Resolve the format, recipes, passes and data of a build, refusing what cannot run.

    Raises:
        PackagerError (or a subclass): an unknown format or recipe, a pass that cannot
            serve the profile or format, a bad pass config, missing data.
    """
    pipeline = detect_format(settings.model)
    profile = settings.profile
    forced = getattr(settings, pipeline.forced_by)
    names = [forced] if forced else pipeline.chain(profile)
    recipes = [pipeline.recipe(name) for name in names]
    prepare = [(step, _instantiate(step, settings, pipeline)) for step in pipeline.prepare]
    chain = [
        (recipe, [_instantiate(step, settings, pipeline) for step in recipe.steps])
        for recipe in recipes
    ]
    gate = _instantiate(pipeline.gate.step, settings, pipeline)
    measure = _instantiate(pipeline.measure.step, settings, pipeline) if settings.measure else None
    package = _instantiate(Step(Package.name), settings, pipeline)
    pipeline.data.check(pipeline, settings)
    return Plan(pipeline, prepare, chain, gate, measure, package)


def build(settings: BuildConfig, progress: Progress = lambda message: None) -> BuildResult:
    """Build, gate, measure and sign one bundle. See the module docstring for the steps.

    Raises:
        PackagerError (or a subclass): anything the user can fix; the message says how.
    """
    started = time.perf_counter()
    plan = plan_build(settings)
    load_private_key(settings.key)  # a bad key should fail now, not after minutes of work
    own_workdir = settings.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="edgepack-build-")) if own_workdir else settings.workdir
    try:
        ctx = PassContext(
            workdir=workdir, profile=settings.profile, source=settings.model, progress=progress
        )
        manifest = _run(plan, settings, ctx)
        return BuildResult(settings.output, manifest, time.perf_counter() - started)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(plan: Plan, settings: BuildConfig, ctx: PassContext) -> Manifest:
    pipeline, profile, progress = plan.pipeline, settings.profile, ctx.progress
    model = ModelArtifact(settings.model, pipeline.name)
    facts: dict[str, Any] = {}
    records: list[PassRecord] = []
    data_loaded = False
    for step, prepare_pass in plan.prepare:
        if prepare_pass.needs_data and not data_loaded:
            pipeline.data.load(settings, facts, ctx)
            data_loaded = True
        if step.announce:
            progress(step.announce(profile))
        output, record = prepare_pass.run(model, ctx)
        model = output.artifact
        facts.update(output.metrics)
        if record.output is not None or not step.only_if_changed:
            records.append(record)
        if step.report:
            progress(step.report(output.metrics, model.precision))
    if not data_loaded:
        pipeline.data.load(settings, facts, ctx)

    attempts, chosen, recipe_records = _try_chain(plan, settings, ctx, model)
    digests: dict[Path, str] = {}
    steps = [record.step(digests, settings.measure) for record in records + recipe_records]

    measurements = None
    if plan.measure is not None:
        progress(pipeline.measure.announce)
        measured, _ = plan.measure.run(ModelArtifact(chosen.path, pipeline.name), ctx)
        measurements = pipeline.measure.figures(**measured.metrics)
    memory = pipeline.fit(profile, chosen.path, measurements, facts)
    extra = pipeline.extra_manifest(chosen, facts, settings, profile, progress)

    gate = pipeline.gate
    request = PackageRequest(
        output=settings.output,
        key=settings.key,
        name=settings.name or settings.model.stem,
        version=settings.version,
        created_epoch=created_epoch(settings.model),
        inputs=facts.get("inputs", []),
        outputs=facts.get("outputs", []),
        opset=facts.get("opset"),
        signature=facts.get("signature"),
        recipe=chosen.recipe,
        chosen_metrics=chosen.metrics,
        quantization=QuantizationRecord(
            chosen=chosen.recipe,
            gate_metric=gate.metric(ctx.task),
            max_degradation=gate.threshold(settings),
            eval_samples=gate.eval_samples(chosen.metrics, ctx),
            attempts=attempts,
            task=ctx.task,
        ),
        memory=memory,
        measurements=measurements,
        tools=tool_versions(pipeline),
        backend=pipeline.backend_spec(profile),
        steps=steps,
        digests=digests,
        **extra,
    )
    request = attach_wheelhouse(settings, request, progress)
    progress(pipeline.package_announce)
    packaged, _ = plan.package.run(
        ModelArtifact(chosen.path, pipeline.name, chosen.precision), ctx, request=request
    )
    return packaged.metrics["manifest"]


def _try_chain(plan: Plan, settings: BuildConfig, ctx: PassContext, prepared: ModelArtifact):
    """Try each recipe in order: the attempts, the first passing candidate, its records."""
    gate, progress = plan.pipeline.gate, ctx.progress
    limit = gate.threshold(settings)
    attempts: list[Attempt] = []
    census = plan.pipeline.weights
    before = census(prepared.path) if census is not None else None
    for recipe, passes in plan.chain:
        if recipe.needs_calibration and ctx.calibration is None:
            attempts.append(
                Attempt(recipe=recipe.name, status="skipped", reason="needs --calibration FILE.npz")
            )
            progress(f"{recipe.name}: skipped (no calibration data)")
            continue
        progress(plan.pipeline.announce(recipe))
        candidate, records, excluded = prepared, [], []
        try:
            for recipe_pass in passes:
                output, record = recipe_pass.run(candidate, ctx)
                candidate = output.artifact
                records.append(record)
                # A mixed-precision pass names the nodes it kept in float.
                excluded = list(output.metrics.get("excluded_nodes", excluded))
            if census is not None:
                candidate = _precision_from_file(candidate, census, before, bool(passes))
            progress(gate.evaluating(recipe.name, ctx))
            evaluated, _ = plan.gate.run(candidate, ctx)
        except RecipeSkippedError as exc:
            attempts.append(Attempt(recipe=recipe.name, status="skipped", reason=str(exc)[:500]))
            progress(f"{recipe.name}: skipped: {exc}")
            continue
        except PassFailedError as exc:
            attempts.append(Attempt(recipe=recipe.name, status="error", reason=str(exc)[:500]))
            progress(f"{recipe.name}: error: {exc}")
            continue
        metrics = dict(evaluated.metrics)
        passed = bool(metrics.pop("passed"))
        # The gate's words may name the worst output, so they see the per-output scores.
        reason = None if passed else gate.reason(metrics, limit)
        verdict = gate.verdict(recipe.name, metrics, passed)
        outputs = metrics.pop("outputs", [])  # per-output scores (OutputScore fields)
        attempts.append(
            Attempt(
                recipe=recipe.name,
                status="passed" if passed else "failed",
                reason=reason,
                metrics=metrics,
                size_bytes=candidate.path.stat().st_size,
                outputs=outputs,
                excluded_nodes=excluded,
            )
        )
        progress(verdict)
        if passed:
            chosen = Chosen(candidate.path, recipe.name, candidate.precision, metrics)
            return attempts, chosen, records
    failed, fix = gate.refusal(limit)
    raise GateError(
        f"{failed}: "
        + "; ".join(f"{a.recipe}: {a.status} ({a.reason})" for a in attempts)
        + f". {fix}",
        attempts,
    )


def _precision_from_file(candidate: ModelArtifact, census, before, transformed: bool):
    """The candidate with the precision its file holds. A recipe whose passes meant to
    quantize (their artifact claims int8 or fp16) but left no more weights of that type
    than the prepared model had fails (PassFailedError: an error attempt)."""
    found = census(candidate.path)
    claimed = candidate.precision
    if transformed and claimed != "fp32" and found.count(claimed) <= before.count(claimed):
        raise PassFailedError(f"nothing was quantized ({found.describe(claimed)})")
    return dataclasses.replace(candidate, precision=found.precision)


def created_epoch(model: Path) -> int:
    """SOURCE_DATE_EPOCH when set (reproducible builds), else the model file's mtime."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value:
        try:
            return int(value)
        except ValueError:
            raise PackagerError(f"SOURCE_DATE_EPOCH={value!r} is not an integer") from None
    return int(model.stat().st_mtime)


def tool_versions(pipeline: FormatPipeline) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in pipeline.tool_distributions:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def attach_wheelhouse(settings: BuildConfig, request: PackageRequest, progress: Progress):
    """With ``--with-wheels``: fill the wheelhouse and put its hashes in the request."""
    if not settings.with_wheels:
        return request
    from .wheelhouse import build_wheelhouse

    spec = build_wheelhouse(
        settings.output,
        request.backend.name,
        settings.profile.python.platform_tag,
        settings.profile.python.python_version,
        metadata.version("edgepack"),
        settings.extra_wheels,
        progress,
    )
    return dataclasses.replace(request, wheelhouse=spec)
