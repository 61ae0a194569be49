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

from edge_runtime.manifest import Attempt, Manifest, QuantizationRecord, SpeedCheck

from .errors import GateError, PackagerError
from .formats import detect_format
from .formats.base import Chosen, FormatPipeline, Recipe, Step
from .keys import load_private_key
from .passes import ModelArtifact, Package, Pass, PassContext, get_pass
from .passes.base import PassFailedError, PassRecord, RecipeSkippedError
from .passes.package import PackageRequest, package_options
from .settings import BuildConfig
from .speed import slower_reason, speed_check

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
    package = _instantiate(Step(Package.name, options=package_options), settings, pipeline)
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
        serving=profile.serving.spec(),
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
    gate = plan.pipeline.gate
    limit = gate.threshold(settings)
    attempts: list[Attempt] = []
    census = plan.pipeline.weights
    before = census(prepared.path) if census is not None else None
    judged: dict[Path, dict[str, Any]] = {}

    def judge(artifact: ModelArtifact) -> dict[str, Any]:
        """The gate's figures for a candidate a pass is still searching over."""
        evaluated, _ = plan.gate.run(artifact, ctx)
        judged[artifact.path] = dict(evaluated.metrics)
        return dict(evaluated.metrics)

    ctx.judge = judge
    try:
        for index, (recipe, passes) in enumerate(plan.chain):
            attempt, chosen, records = _try_recipe(
                plan, settings, ctx, prepared, recipe, passes, before, judged
            )
            attempts.append(attempt)
            if chosen is None:
                continue
            if attempt.excluded_nodes and attempt.speed is not None:
                return _race_next(
                    plan, settings, ctx, prepared, index, before, judged, attempts, chosen, records
                )
            return attempts, chosen, records
    finally:
        ctx.judge = None
    failed, fix = gate.refusal(limit)
    raise GateError(
        f"{failed}: "
        + "; ".join(f"{a.recipe}: {a.status} ({a.reason})" for a in attempts)
        + f". {fix}",
        attempts,
    )


def _race_next(plan, settings, ctx, prepared, index, before, judged, attempts, chosen, records):
    """A mixed-precision candidate (nodes kept in float) passed and was timed. Its float
    islands and the QDQ pairs around them cost time, so the next recipe in the chain (on
    the shipped CPU profiles, dynamic int8 of every weight) is tried too, and chosen
    instead when it passes with the same precision and runs faster on this host; the
    slower of the two is recorded as failed, with both speeds."""
    if index + 1 >= len(plan.chain):
        return attempts, chosen, records
    recipe, passes = plan.chain[index + 1]
    ctx.progress(f"{recipe.name}: tried too, in case it is faster than {chosen.recipe}")
    rival, rival_chosen, rival_records = _try_recipe(
        plan, settings, ctx, prepared, recipe, passes, before, judged
    )
    attempts.append(rival)
    mixed = attempts[-2]
    if (
        rival_chosen is None
        or rival_chosen.precision != chosen.precision
        or rival.speed is None
        or rival.speed.ratio <= mixed.speed.ratio
    ):
        if rival_chosen is not None:
            attempts[-1] = _lost(rival, mixed)
        return attempts, chosen, records
    attempts[-2] = _lost(mixed, rival)
    ctx.progress(
        f"{rival.recipe}: chosen, {rival.speed.ratio:.2f}x fp32 against "
        f"{mixed.speed.ratio:.2f}x for {mixed.recipe}"
    )
    return attempts, rival_chosen, rival_records


def _lost(loser: Attempt, winner: Attempt) -> Attempt:
    """``loser`` passed the gate but ``winner`` was chosen over it (on speed or precision)."""
    if winner.speed is None or loser.speed is None:
        reason = f"passed, but {winner.recipe} came first"
    else:
        reason = (
            f"slower than {winner.recipe} on this host ({loser.speed.ratio:.2g}x fp32 "
            f"against {winner.speed.ratio:.2g}x)"
        )
    return loser.model_copy(update={"status": "failed", "reason": reason})


def _try_recipe(
    plan: Plan,
    settings: BuildConfig,
    ctx: PassContext,
    prepared: ModelArtifact,
    recipe: Recipe,
    passes: list[Pass],
    before,
    judged: dict[Path, dict[str, Any]],
) -> tuple[Attempt, Chosen | None, list[PassRecord]]:
    """One recipe: its passes, the gate, and for a quantized candidate that passed, the
    speed check against the prepared float model."""
    gate, progress, census = plan.pipeline.gate, ctx.progress, plan.pipeline.weights
    if recipe.needs_calibration and ctx.calibration is None:
        progress(f"{recipe.name}: skipped (no calibration data)")
        return (
            Attempt(recipe=recipe.name, status="skipped", reason="needs --calibration FILE.npz"),
            None,
            [],
        )
    progress(plan.pipeline.announce(recipe))
    candidate, records, excluded = prepared, [], []
    try:
        for step, recipe_pass in zip(recipe.steps, passes, strict=True):
            output, record = recipe_pass.run(candidate, ctx)
            candidate = output.artifact
            # As in prepare: a step that found nothing to change leaves no record.
            if record.output is not None or not step.only_if_changed:
                records.append(record)
            # A mixed-precision pass names the nodes it kept in float.
            excluded = list(output.metrics.get("excluded_nodes", excluded))
        if census is not None:
            candidate = _precision_from_file(candidate, census, before, bool(passes))
        if candidate.path in judged:  # a searching pass already ran the gate on it
            metrics = dict(judged[candidate.path])
        else:
            progress(gate.evaluating(recipe.name, ctx))
            evaluated, _ = plan.gate.run(candidate, ctx)
            metrics = dict(evaluated.metrics)
    except RecipeSkippedError as exc:
        progress(f"{recipe.name}: skipped: {exc}")
        return Attempt(recipe=recipe.name, status="skipped", reason=str(exc)[:500]), None, []
    except PassFailedError as exc:
        progress(f"{recipe.name}: error: {exc}")
        return Attempt(recipe=recipe.name, status="error", reason=str(exc)[:500]), None, []
    passed = bool(metrics.pop("passed"))
    # The gate's words may name the worst output, so they see the per-output scores.
    reason = None if passed else gate.reason(metrics, gate.threshold(settings))
    progress(gate.verdict(recipe.name, metrics, passed))
    outputs = metrics.pop("outputs", [])  # per-output scores (OutputScore fields)
    speed = None
    if passed and candidate.precision != "fp32" and _times_candidates(plan, settings, ctx):
        speed = _speed_check(plan, ctx, recipe, candidate, prepared)
        reason = slower_reason(speed)
        passed = reason is None
    attempt = Attempt(
        recipe=recipe.name,
        status="passed" if passed else "failed",
        reason=reason,
        metrics=metrics,
        size_bytes=candidate.path.stat().st_size,
        outputs=outputs,
        excluded_nodes=excluded,
        speed=speed,
    )
    if not passed:
        return attempt, None, records
    return attempt, Chosen(candidate.path, recipe.name, candidate.precision, metrics), records


def _times_candidates(plan: Plan, settings: BuildConfig, ctx: PassContext) -> bool:
    """Whether quantized candidates are timed against float: the format opens models on
    this host, and the build measures (``--no-measure`` builds time nothing, so that two
    of them give the same bytes) with the speed check on (``--no-speed-check``)."""
    return (
        settings.measure
        and settings.speed_check
        and plan.pipeline.host_session is not None
        and bool(ctx.evaluation)
    )


def _speed_check(
    plan: Plan, ctx: PassContext, recipe: Recipe, candidate: ModelArtifact, prepared: ModelArtifact
) -> SpeedCheck:
    ctx.progress(f"{recipe.name}: timing against fp32 on this host, side by side")
    # The first eval sample, fed as the model is (batch axes, constants; a stateful
    # model's first step).
    dataset = ctx.eval_sets[0]
    run = ctx.source_run() if dataset.feeder.sequential else None
    feed = next(iter(dataset.feeds(run, samples=1)))
    speed = speed_check(plan.pipeline, ctx.profile, candidate.path, prepared.path, feed)
    where = "" if speed.representative else f" (not representative of {ctx.profile.arch.value})"
    ctx.progress(f"{recipe.name}: {speed.ratio:.2f}x the speed of fp32 on this host{where}")
    return speed


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
