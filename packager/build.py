"""``build_bundle``: the pipeline behind ``edgepack build``.

Validate -> optimize -> for each recipe in the chain: quantize, evaluate, gate ->
measure -> check the memory fit -> package. Every recipe tried is recorded.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from edge_runtime.manifest import (
    Attempt,
    BackendSpec,
    OnnxBackendSpec,
    TfliteBackendSpec,
    Manifest,
    Measurements,
    MemoryFit,
    QuantizationRecord,
)

from .data import load_npz
from .errors import FitError, GateError, ModelValidationError, PackagerError
from .keys import load_private_key
from .passes import (
    Evaluate,
    Measure,
    ModelArtifact,
    OnnxGraphOptimize,
    OnnxValidate,
    Package,
    PassContext,
    TfliteValidate,
    get_pass,
)
from .passes.base import PassFailedError, RecipeSkippedError
from .passes.evaluate import SOURCE_KEY
from .passes.package import REQUEST_KEY, PackageRequest
from .profiles import DeviceProfile
from .recipes import resolve_chain
from .settings import BuildConfig

MODEL_FORMATS = {".onnx": "onnx", ".gguf": "gguf", ".tflite": "tflite"}
PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".bin"}
# Without a measurement the fit check uses this estimate: ONNX Runtime holds the weights
# once plus pre-packed copies of some of them, and a little for activations and the engine.
ESTIMATE_WEIGHT_FACTOR = 1.5
ESTIMATE_OVERHEAD_MB = 16.0


@dataclass(frozen=True)
class BuildResult:
    bundle: Path
    manifest: Manifest
    seconds: float


def _created_epoch(model: Path) -> int:
    """SOURCE_DATE_EPOCH when set (reproducible builds), else the model file's mtime."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value:
        try:
            return int(value)
        except ValueError:
            raise PackagerError(f"SOURCE_DATE_EPOCH={value!r} is not an integer") from None
    return int(model.stat().st_mtime)


TOOL_DISTRIBUTIONS = {
    "onnx": ("edgepack", "onnx", "onnxruntime", "onnxconverter-common", "numpy"),
    "tflite": ("edgepack", "ai-edge-litert", "ai-edge-quantizer", "numpy"),
}


def tool_versions(model_format: str = "onnx") -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in TOOL_DISTRIBUTIONS[model_format]:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def detect_format(model: Path) -> str:
    suffix = model.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ModelValidationError(
            f"{model.name}: pickle-based model formats are refused (loading them can run "
            "arbitrary code); export to ONNX first (torch.onnx.export) or convert to "
            "TFLite (litert_torch.convert)"
        )
    if suffix not in MODEL_FORMATS:
        raise ModelValidationError(
            f"{model.name}: unsupported model format {suffix!r}; give one of "
            f"{', '.join(sorted(MODEL_FORMATS))}"
        )
    if not model.is_file():
        raise ModelValidationError(f"model file {model} does not exist")
    return MODEL_FORMATS[suffix]


def build_bundle(
    config: BuildConfig, progress: Callable[[str], None] = lambda m: None
) -> BuildResult:
    """Build, gate, measure and sign one bundle. See the module docstring for the steps.

    Raises:
        PackagerError (or a subclass): anything the user can fix; the message says how.
    """
    import time

    started = time.perf_counter()
    model_format = detect_format(config.model)
    profile = config.profile
    if model_format == "gguf":
        from .build_gguf import resolve_quant_chain

        resolve_quant_chain(profile, config.quant)  # refuse before any work
    else:
        chain = resolve_chain(profile, config.recipe, model_format)
        if config.eval is None:
            raise PackagerError(
                f"a{'n ONNX' if model_format == 'onnx' else ' TFLite'} build needs "
                "--eval FILE.npz (held-out inputs, one array per model input)"
            )
    load_private_key(config.key)  # a bad key should fail now, not after minutes of work

    own_workdir = config.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="edgepack-build-")) if own_workdir else config.workdir
    try:
        ctx = PassContext(workdir=workdir, profile=profile, progress=progress)
        if model_format == "gguf":
            from .build_gguf import build_gguf_bundle

            return build_gguf_bundle(config, ctx, progress, started, _created_epoch(config.model))
        source = ModelArtifact(config.model, model_format)
        validated, optimized = _validate_and_optimize(source, ctx, progress)
        inputs, outputs = validated.metrics["inputs"], validated.metrics["outputs"]
        input_names = [spec.name for spec in inputs]
        ctx.evaluation, ctx.labels = load_npz(config.eval, input_names, "eval")
        check_data(inputs, ctx.evaluation, config.eval)
        if config.calibration is not None:
            ctx.calibration, _ = load_npz(config.calibration, input_names, "calibration")
            check_data(inputs, ctx.calibration, config.calibration)
        ctx.task = _resolve_task(config.task, ctx.labels)
        ctx.cache[SOURCE_KEY] = config.model

        attempts, chosen, chosen_metrics = _try_chain(config, ctx, chain, optimized, progress)

        measurements = None
        if config.measure:
            progress("measure: latency p50/p95, peak memory on this host")
            measured, _ = Measure().run(chosen, ctx)
            measurements = Measurements(**measured.metrics)
        memory = check_fit(profile, chosen.path.stat().st_size, measurements)

        progress("package: manifest, self-test vectors, signature")
        quantization = QuantizationRecord(
            chosen=chosen_metrics["recipe"],
            gate_metric="1 - top1_agreement" if ctx.task == "classification" else "1 - cosine_mean",
            max_degradation=config.max_degradation,
            eval_samples=len(next(iter(ctx.evaluation.values()))),
            attempts=attempts,
        )
        ctx.cache[REQUEST_KEY] = PackageRequest(
            output=config.output,
            key=config.key,
            name=config.name or config.model.stem,
            version=config.version,
            created_epoch=_created_epoch(config.model),
            inputs=inputs,
            outputs=outputs,
            opset=validated.metrics.get("opset"),
            signature=validated.metrics.get("signature"),
            recipe=chosen_metrics["recipe"],
            chosen_metrics=chosen_metrics["metrics"],
            quantization=quantization,
            memory=memory,
            measurements=measurements,
            tools=tool_versions(model_format),
            backend=backend_spec(profile, model_format),
        )
        attach_wheelhouse(config, ctx, progress)
        packaged, _ = Package().run(chosen, ctx)
        return BuildResult(
            config.output, packaged.metrics["manifest"], time.perf_counter() - started
        )
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _validate_and_optimize(source: ModelArtifact, ctx: PassContext, progress):
    """The format's validation pass, then (ONNX) offline graph optimization."""
    if source.format == "tflite":
        progress("validate: flatbuffer structure, interpreter load, signature")
        validated, _ = TfliteValidate().run(source, ctx)
        facts = validated.metrics["facts"]
        progress(
            f"validate: {validated.metrics['interpreter']}, {facts.operators} operators, "
            f"{validated.artifact.precision} weights"
        )
        return validated, validated.artifact
    progress("validate: onnx checker, opset, external data")
    validated, _ = OnnxValidate().run(source, ctx)
    level = ctx.profile.onnx.graph_optimization
    progress(f"optimize: ONNX Runtime graph optimization ({level})")
    optimized, _ = OnnxGraphOptimize({"level": level}).run(source, ctx)
    return validated, optimized.artifact


def backend_spec(profile: DeviceProfile, model_format: str) -> BackendSpec:
    if model_format == "tflite":
        return TfliteBackendSpec(
            intra_op_threads=profile.tflite.threads,
            xnnpack=profile.tflite.xnnpack,
        )
    return OnnxBackendSpec(
        providers=profile.onnx.providers,
        intra_op_threads=profile.onnx.threads,
        enable_cpu_mem_arena=profile.onnx.cpu_mem_arena,
        allow_spinning=profile.onnx.allow_spinning,
    )


def check_data(specs, arrays: dict, path: Path) -> None:
    """Refuse data whose dtype or fixed sizes cannot feed the model, before any work."""
    from edge_runtime.errors import InputSignatureError
    from edge_runtime.runtime import check_inputs

    from .data import sample
    from .errors import DataError

    try:
        check_inputs(specs, sample(arrays, 0))
    except InputSignatureError as exc:
        raise DataError(
            f"{path}: {exc} (the model takes one sample per call on its first axis)"
        ) from None


def attach_wheelhouse(config: BuildConfig, ctx: PassContext, progress) -> None:
    """With ``--with-wheels``: fill the wheelhouse and put its hashes in the manifest."""
    if not config.with_wheels:
        return
    import dataclasses

    from .wheelhouse import build_wheelhouse

    request: PackageRequest = ctx.cache[REQUEST_KEY]
    profile = config.profile
    spec = build_wheelhouse(
        config.output,
        request.backend.name,
        profile.python.platform_tag,
        profile.python.python_version,
        metadata.version("edgepack"),
        config.extra_wheels,
        progress,
    )
    ctx.cache[REQUEST_KEY] = dataclasses.replace(request, wheelhouse=spec)


def _resolve_task(task: str, labels) -> str:
    if task == "auto":
        return "classification" if labels is not None else "generic"
    return task


def _try_chain(config, ctx, chain, optimized: ModelArtifact, progress):
    """Try each recipe in order; return the attempts, the first passing model and its figures."""
    attempts: list[Attempt] = []
    for recipe in chain:
        if recipe.needs_calibration and ctx.calibration is None:
            attempts.append(
                Attempt(recipe=recipe.name, status="skipped", reason="needs --calibration FILE.npz")
            )
            progress(f"{recipe.name}: skipped (no calibration data)")
            continue
        progress(f"{recipe.name}: {recipe.description}")
        candidate = optimized
        try:
            for pass_name, pass_config in recipe.passes:
                output, _ = get_pass(pass_name)(pass_config).run(candidate, ctx)
                candidate = output.artifact
            progress(
                f"{recipe.name}: evaluating on {len(next(iter(ctx.evaluation.values())))} samples"
            )
            evaluated, _ = Evaluate({"max_degradation": config.max_degradation}).run(candidate, ctx)
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
        attempts.append(
            Attempt(
                recipe=recipe.name,
                status="passed" if passed else "failed",
                reason=None
                if passed
                else (f"degradation {metrics['degradation']:.4g} > {config.max_degradation:.4g}"),
                metrics=metrics,
                size_bytes=candidate.path.stat().st_size,
            )
        )
        progress(f"{recipe.name}: {'passed' if passed else 'failed'} the gate")
        if passed:
            return attempts, candidate, {"recipe": recipe.name, "metrics": metrics}
    raise GateError(
        f"no recipe met --max-degradation {config.max_degradation}: "
        + "; ".join(f"{a.recipe}: {a.status} ({a.reason})" for a in attempts)
        + ". Raise the threshold, add fp32 to the profile's recipes, or check the eval data.",
        attempts,
    )


def check_fit(
    profile: DeviceProfile, model_bytes: int, measurements: Measurements | None
) -> MemoryFit:
    """Compare the model's memory need with the profile's budget.

    Raises:
        FitError: the model needs more than the profile allows.
    """
    size_mb = model_bytes / 2**20
    if measurements is not None:
        required, basis = max(measurements.peak_memory_mb, size_mb), "measured"
    else:
        required, basis = size_mb * ESTIMATE_WEIGHT_FACTOR + ESTIMATE_OVERHEAD_MB, "estimated"
    fit = MemoryFit(
        budget_mb=float(profile.model_memory_budget_mb), required_mb=round(required, 1), basis=basis
    )
    if fit.required_mb > fit.budget_mb:
        raise FitError(
            f"the model needs about {fit.required_mb:.1f} MB ({basis}) but profile "
            f"{profile.name!r} allows {fit.budget_mb:.0f} MB for the model; pick a larger "
            "device profile, a more compressed recipe, or a smaller model"
        )
    return fit
