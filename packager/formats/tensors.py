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
    from ..metrics import check_settings  # numpy comes with the metrics, not the profiles

    check_settings(settings.metric, settings.metric_plugin)
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
    from ..text import check_text_options, load_tokenizer

    check_text_options(settings)
    if settings.tokenizer is not None:
        load_tokenizer(settings.tokenizer)  # a bad file fails now, not after the recipes
    flags = settings.batch_axis or settings.constant or settings.state or settings.tokenizer
    if flags and pipeline.signature:
        from ..feeding import feeding_spec
        from ..text import text_spec

        try:
            inputs, outputs = pipeline.signature(settings.model)
        except (TypeError, AttributeError, ImportError, NameError):
            raise  # a bug in edgepack, not a model the check could not read
        except Exception:  # noqa: BLE001 - the validating step says what is wrong with it
            return
        text_spec(settings, inputs, outputs, feeding_spec(settings, inputs, outputs))


def _load_data(settings, facts: dict[str, Any], ctx) -> None:
    # numpy comes with the data, not the profiles
    from edge_runtime.feeding import Feeder

    from ..data import load_dataset
    from ..feeding import feeding_spec

    inputs, outputs = facts["inputs"], facts.get("outputs", [])
    spec = feeding_spec(settings, inputs, outputs)
    facts["feeding"] = spec
    from ..text import text_spec

    facts["text"] = text_spec(settings, inputs, outputs, spec, ctx.progress)
    feeder = Feeder(inputs, outputs, spec)
    eval_sets = [load_dataset(path, feeder, "eval") for path in settings.eval]
    calibration_sets = [load_dataset(path, feeder, "calibration") for path in settings.calibration]
    ctx.use_data(eval_sets, calibration_sets)
    ctx.task = settings.task
    _check_metric_names(settings, facts)


def _check_metric_names(settings, facts: dict[str, Any]) -> None:
    """--metric must name outputs (and mask inputs) the prepared model has."""
    from ..metrics import check_names, parse_overrides

    check_names(
        parse_overrides(settings.metric),
        [spec.name for spec in facts["outputs"]],
        [spec.name for spec in facts["inputs"]],
    )


TENSOR_DATA = DataNeeds(check=_check_data, load=_load_data)


def _samples(ctx) -> int:
    return sum(dataset.samples for dataset in ctx.eval_sets)


def _gate_options(settings, profile) -> dict[str, Any]:
    return {
        "max_degradation": settings.max_degradation,
        "max_degradation_given": "max_degradation" in settings.model_fields_set,
        "task": settings.task,
        "metric": dict(settings.metric),
        "metric_plugin": settings.metric_plugin,
    }


def _gate_metric(task: str) -> str:
    """The manifest's gate_metric: per-output metrics, the worst output decides."""
    if task == "generic":
        return "1 - cosine_mean"  # every output by cosine, as before per-output metrics
    chosen = "auto" if task == "auto" else f"task {task}"
    return f"per-output metrics ({chosen}), worst output"


def _worst(metrics) -> dict[str, Any] | None:
    rows = metrics.get("outputs") or []
    failing = [row for row in rows if not _field(row, "passed")]
    pool = failing or rows
    if not pool:
        return None
    return max(pool, key=lambda row: _field(row, "degradation") - _field(row, "threshold"))


def _field(row, name: str):
    return row[name] if isinstance(row, dict) else getattr(row, name)


def _where(row) -> str:
    output = _field(row, "output")
    eval_file = _field(row, "eval_file")
    named = "the metric plugin" if output == "*" else f"output {output!r}"
    return f"{named} ({_field(row, 'metric')}{', ' + eval_file if eval_file else ''})"


def _reason(metrics, limit: float) -> str:
    """Why a candidate failed: the worst output, its metric and its own threshold."""
    worst = _worst(metrics)
    if worst is None:
        return f"degradation {metrics['degradation']:.4g} > {limit:.4g}"
    return (
        f"degradation {_field(worst, 'degradation'):.4g} > {_field(worst, 'threshold'):.4g} "
        f"on {_where(worst)}"
    )


def _verdict(name: str, metrics, passed: bool) -> str:
    worst = _worst(metrics)
    if worst is None:
        return f"{name}: {'passed' if passed else 'failed'} the gate"
    word = "passed" if passed else "failed"
    return (
        f"{name}: {word} the gate (worst: {_where(worst)}, degradation "
        f"{_field(worst, 'degradation'):.4g}, limit {_field(worst, 'threshold'):.4g})"
    )


TENSOR_GATE = Gate(
    step=Step("Evaluate", options=_gate_options),
    threshold=lambda settings: settings.max_degradation,
    metric=_gate_metric,
    evaluating=lambda name, ctx: f"{name}: evaluating on {_samples(ctx)} samples",
    verdict=_verdict,
    reason=_reason,
    refusal=lambda limit: (
        f"no recipe met --max-degradation {limit} (or an output's own limit)",
        "Raise the threshold (or one output's: --metric OUTPUT=NAME:max=V), pick a metric "
        "that fits the output (--task, --metric; docs/quantization.md), add fp32 to the "
        "profile's recipes, or check the eval data.",
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
    # records how the model is fed, so the device feeds it as the gate did, and with
    # --tokenizer how text becomes its inputs (the tokenizer travels in the bundle).
    text = facts.get("text")
    if text is None:
        return {"feeding": facts.get("feeding")}
    return {
        "feeding": facts.get("feeding"),
        "text": text,
        "extra_files": {text.tokenizer: Path(settings.tokenizer)},
    }


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
