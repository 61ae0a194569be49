"""The parts of a format pipeline shared by the formats that run tensors (ONNX, TFLite).

Both take ``--eval``/``--calibration`` .npz files keyed by input name, are gated on their
outputs against the source model's (``Evaluate``), timed at batch 1 by the measuring
worker, and fit the budget on their measured peak memory (or an estimate from the file
size). A format module builds its pipeline with ``tensor_format``, giving only what is
its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edge_runtime.manifest import Measurements, MemoryFit

from ..errors import DataError, FitError, PackagerError
from .base import Chosen, DataNeeds, FormatPipeline, Gate, Measure, Step, WeightCensus

# Without a measurement the fit check uses this estimate: the engine holds the weights
# once plus pre-packed copies of some of them, and a little for activations and itself.
ESTIMATE_WEIGHT_FACTOR = 1.5
ESTIMATE_OVERHEAD_MB = 16.0


def _check_data(pipeline: FormatPipeline, settings) -> None:
    if not settings.eval:
        raise PackagerError(
            f"{pipeline.noun} build needs --eval FILE.npz (held-out inputs, one array per "
            "model input)"
        )
    # Every file is there before any work; their content is checked once the model's
    # inputs are known (_load_data, right after validation).
    for what in ("eval", "calibration"):
        for path in getattr(settings, what):
            if not Path(path).is_file():
                raise DataError(f"{what} file {path} does not exist")
            if Path(path).suffix.lower() != ".npz":
                raise DataError(
                    f"{what} file {path}: {pipeline.noun} build takes .npz files (np.savez, "
                    "one array per model input, samples first)"
                )
    if (settings.batch_axis or settings.constant or settings.state) and pipeline.signature:
        from ..feeding import feeding_spec

        try:
            inputs, outputs = pipeline.signature(settings.model)
        except (TypeError, AttributeError, ImportError, NameError):
            raise  # a bug in edgepack, not a model the check could not read
        except Exception:  # noqa: BLE001 - the validating step says what is wrong with it
            return
        feeding_spec(settings, inputs, outputs)


def _load_data(settings, facts: dict[str, Any], ctx) -> None:
    # numpy comes with the data, not the profiles
    from edge_runtime.feeding import Feeder

    from ..data import load_dataset
    from ..feeding import feeding_spec

    inputs, outputs = facts["inputs"], facts.get("outputs", [])
    spec = feeding_spec(settings, inputs, outputs)
    facts["feeding"] = spec
    feeder = Feeder(inputs, outputs, spec)
    eval_sets = [load_dataset(path, feeder, "eval") for path in settings.eval]
    calibration_sets = [load_dataset(path, feeder, "calibration") for path in settings.calibration]
    ctx.use_data(eval_sets, calibration_sets)
    if settings.task == "auto":
        ctx.task = "classification" if ctx.labels is not None else "generic"
    else:
        ctx.task = settings.task


TENSOR_DATA = DataNeeds(check=_check_data, load=_load_data)


def _samples(ctx) -> int:
    return sum(dataset.samples for dataset in ctx.eval_sets)


TENSOR_GATE = Gate(
    step=Step("Evaluate", options=lambda s, p: {"max_degradation": s.max_degradation}),
    threshold=lambda settings: settings.max_degradation,
    metric=lambda task: "1 - top1_agreement" if task == "classification" else "1 - cosine_mean",
    evaluating=lambda name, ctx: f"{name}: evaluating on {_samples(ctx)} samples",
    verdict=lambda name, metrics, passed: f"{name}: {'passed' if passed else 'failed'} the gate",
    reason=lambda metrics, limit: f"degradation {metrics['degradation']:.4g} > {limit:.4g}",
    refusal=lambda limit: (
        f"no recipe met --max-degradation {limit}",
        "Raise the threshold, add fp32 to the profile's recipes, or check the eval data.",
    ),
    eval_samples=lambda metrics, ctx: _samples(ctx),
)


def check_tensor_fit(
    profile, model: Path, measurements: Measurements | None, facts: dict[str, Any]
) -> MemoryFit:
    """Compare the model's memory need with the profile's budget.

    Measured: the worker's peak memory (see docs/profiles.md), at least the file size.

    Raises:
        FitError: the model needs more than the profile allows.
    """
    size_mb = model.stat().st_size / 2**20
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


def _feeding(chosen: Chosen, facts, settings, profile, progress) -> dict[str, Any]:
    # The Package pass writes the self-test vectors from the eval data; the manifest
    # records how the model is fed, so the device feeds it as the gate did.
    return {"feeding": facts.get("feeding")}


def tensor_bench(run: Callable[[dict], Any], request: dict) -> Callable[[], dict]:
    """For the measuring worker: time ``run`` at batch 1 on the request's inputs."""
    import numpy as np

    with np.load(request["inputs"], allow_pickle=False) as data:
        inputs = {key: data[key] for key in data.files}

    def bench() -> dict:
        for _ in range(request["warmup"]):
            run(inputs)
        timings = []
        for _ in range(request["runs"]):
            started = time.perf_counter()
            run(inputs)
            timings.append((time.perf_counter() - started) * 1000)
        return {
            "runs": len(timings),
            "latency_ms_p50": float(np.percentile(timings, 50)),
            "latency_ms_p95": float(np.percentile(timings, 95)),
        }

    return bench


def tensor_format(
    *, worker_loader: str, weight_counts: Callable[[Path], Mapping[str, int]], **own: Any
) -> FormatPipeline:
    """A ``FormatPipeline`` with the tensor formats' data, gate, measure and fit;
    ``weight_counts`` counts a model file's weight tensors by element type."""
    return FormatPipeline(
        weights=lambda path: WeightCensus(weight_counts(path)),
        data=TENSOR_DATA,
        gate=TENSOR_GATE,
        measure=Measure(
            step=Step("Measure"),
            figures=Measurements,
            worker_loader=worker_loader,
            announce="measure: latency p50/p95, peak memory on this host",
        ),
        fit=check_tensor_fit,
        extra_manifest=_feeding,
        **own,
    )
