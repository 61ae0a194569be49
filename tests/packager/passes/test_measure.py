"""Measure and GgufMeasure: one measuring worker, one result shape, for every format."""

from __future__ import annotations

import pytest

from packager.passes import GgufMeasure, Measure, ModelArtifact, PassContext
from packager.profiles import load_profile

# What the worker reports for every format; the format adds its own timings.
COMMON = {"load_seconds", "peak_memory_mb", "host"}


def test_measure_times_a_tensor_model_in_a_fresh_process(digits_example, tmp_path):
    import numpy as np

    ctx = PassContext(workdir=tmp_path, profile=load_profile("raspberry-pi-4"))
    with np.load(digits_example.eval) as data:
        ctx.evaluation = {"image": data["image"]}

    output, record = Measure().run(ModelArtifact(digits_example.model, "onnx"), ctx)

    figures = output.metrics
    assert set(figures) == COMMON | {"runs", "latency_ms_p50", "latency_ms_p95"}
    assert figures["runs"] == 50
    assert 0 < figures["latency_ms_p50"] <= figures["latency_ms_p95"]
    assert figures["peak_memory_mb"] > 0  # at least ONNX Runtime and the model
    assert record.name == "Measure" and record.output is None


@pytest.mark.slow
def test_measure_reports_pp_and_tg_rates_in_a_fresh_process(smollm2_example, tmp_path):
    ctx = PassContext(workdir=tmp_path, profile=load_profile("raspberry-pi-5"))
    source = ModelArtifact(smollm2_example.model, "gguf", "F16")

    output, record = GgufMeasure({"pp_tokens": 32, "tg_tokens": 8, "repetitions": 1}).run(
        source, ctx
    )

    figures = output.metrics
    assert set(figures) >= COMMON
    assert figures["pp_tokens"] == 32 and figures["tg_tokens"] == 8
    assert figures["pp_tokens_per_s"] > 0 and figures["tg_tokens_per_s"] > 0
    # a batch of prompt tokens is evaluated far faster per token than one token at a time
    assert figures["pp_tokens_per_s"] > figures["tg_tokens_per_s"]
    # the model's own memory (the worker's baseline is subtracted): mostly its weights
    assert figures["peak_memory_mb"] > smollm2_example.model.stat().st_size / 2**20 * 0.5
    assert figures["threads"] >= 1 and "cores" in figures["host"]
    assert record.name == "GgufMeasure"
