"""GGUF passes at their seam: measuring (llama-bench style) and the quantize type check."""

from __future__ import annotations

import pytest

from packager.errors import PackagerError
from packager.passes import GgufMeasure, GgufQuantize, ModelArtifact, PassContext
from packager.profiles import load_profile


@pytest.mark.slow
def test_measure_reports_pp_and_tg_rates_in_a_fresh_process(smollm2_example, tmp_path):
    ctx = PassContext(workdir=tmp_path, profile=load_profile("raspberry-pi-5"))
    source = ModelArtifact(smollm2_example.model, "gguf", "F16")

    output, record = GgufMeasure({"pp_tokens": 32, "tg_tokens": 8, "repetitions": 1}).run(
        source, ctx
    )

    figures = output.metrics
    assert figures["pp_tokens"] == 32 and figures["tg_tokens"] == 8
    assert figures["pp_tokens_per_s"] > 0 and figures["tg_tokens_per_s"] > 0
    # a batch of prompt tokens is evaluated far faster per token than one token at a time
    assert figures["pp_tokens_per_s"] > figures["tg_tokens_per_s"]
    assert figures["peak_memory_mb"] > smollm2_example.model.stat().st_size / 2**20 * 0.5
    assert figures["threads"] >= 1 and "cores" in figures["host"]
    assert record.name == "GgufMeasure"


@pytest.mark.parametrize("bad", ["Q4_KM", "q4_k_m", "INT8", ""])
def test_quantize_refuses_an_unknown_type_when_configured(bad):
    with pytest.raises(PackagerError) as caught:
        GgufQuantize({"quant_type": bad})

    assert "unknown llama.cpp quantization type" in str(caught.value)
    assert "Q4_K_M" in str(caught.value)
