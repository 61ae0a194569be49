"""GGUF passes: validate the source, quantize with llama.cpp, evaluate perplexity."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

from pydantic import Field, field_validator

from edge_runtime.backends.llamacpp import import_llama_cpp
from edge_runtime.cpus import usable_cpus

from ..errors import ModelValidationError
from ..formats.gguf import QUANT_TYPES, check_quant_type, read_source
from .base import ModelArtifact, Pass, PassConfig, PassContext, PassFailedError, PassOutput

# Source precisions the packager quantizes from without --allow-requantize.
HIGH_PRECISION = {"F32", "F16", "BF16"}


class GgufValidateConfig(PassConfig):
    allow_requantize: bool = Field(
        False, description="accept an already-quantized source (each requantization loses more)"
    )


class GgufValidate(Pass):
    """Checks the GGUF header and that the source is high precision (F32, F16 or BF16)."""

    name = "GgufValidate"
    Config = GgufValidateConfig
    input_formats = frozenset({"gguf"})

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        info = read_source(model.path)
        if not info.architecture:
            raise ModelValidationError(
                f"{model.path.name} has no general.architecture; it is not a llama.cpp model"
            )
        source_type = info.weight_type_name
        if source_type not in HIGH_PRECISION:
            if not self.config.allow_requantize:
                raise ModelValidationError(
                    f"{model.path.name} is already quantized ({source_type}); quantizing it "
                    "again compounds the error. Give the F16, BF16 or F32 export (e.g. "
                    "llama.cpp's convert_hf_to_gguf.py --outtype f16), or pass "
                    "--allow-requantize to accept the extra loss"
                )
            message = (
                f"{model.path.name} is already quantized ({source_type}); requantizing it "
                "loses more than quantizing from F16 would, and the gate compares against "
                "this already-degraded source"
            )
            warnings.warn(message, stacklevel=2)
            ctx.progress(f"warning: {message}")
        return PassOutput(
            ModelArtifact(model.path, "gguf", source_type), {"source_type": source_type}
        )


class GgufQuantizeConfig(PassConfig):
    quant_type: str = Field(description="llama.cpp quantization type, e.g. Q4_K_M or Q8_0")
    threads: int = Field(0, ge=0, description="quantizer threads; 0 = every usable CPU")
    allow_requantize: bool = Field(False, description="let llama.cpp requantize quantized data")

    @field_validator("quant_type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        return check_quant_type(value)


@contextlib.contextmanager
def native_output_to(path: Path):
    """Send what C code prints on stdout/stderr to ``path`` (llama.cpp logs every tensor)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "wb") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


class GgufQuantize(Pass):
    """Quantizes with llama.cpp's own quantizer (``llama_model_quantize``)."""

    name = "GgufQuantize"
    Config = GgufQuantizeConfig
    input_formats = frozenset({"gguf"})

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        llama_cpp = import_llama_cpp()

        quant_type = self.config.quant_type
        output = out_dir / f"model-{quant_type}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = QUANT_TYPES[quant_type]
        params.nthread = self.config.threads or usable_cpus().count
        params.allow_requantize = self.config.allow_requantize
        log_path = out_dir / "llama-quantize.log"
        with native_output_to(log_path):
            status = llama_cpp.llama_model_quantize(
                str(model.path).encode(), str(output).encode(), params
            )
        if status != 0 or not output.is_file():
            tail = log_path.read_text(errors="replace")[-1500:]
            raise PassFailedError(f"llama.cpp could not quantize to {quant_type}: {tail}")
        read_source(output)  # the quantizer's output gets the same header checks
        return PassOutput(ModelArtifact(output, "gguf", quant_type))


class GgufEvaluateConfig(PassConfig):
    max_ppl_increase: float = Field(
        0.10, ge=0, description="gate: largest allowed perplexity increase over the source"
    )


class GgufEvaluate(Pass):
    """Perplexity, KL divergence and top-1 agreement against the source model."""

    name = "GgufEvaluate"
    Config = GgufEvaluateConfig
    input_formats = frozenset({"gguf"})

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        from ..llm_eval import compare_scores, score_model

        chunks = ctx.eval_windows
        if ctx.source_score is None:
            ctx.progress(f"scoring the source on {len(chunks)} windows of {len(chunks[0])}")
            ctx.source_score = score_model(ctx.source, chunks, keep_log_probs=True)
        source = ctx.source_score
        candidate = score_model(model.path, chunks, reference=source)
        metrics = compare_scores(candidate, source)
        metrics["degradation"] = metrics["ppl_increase"]
        metrics["passed"] = metrics["ppl_increase"] <= self.config.max_ppl_increase
        return PassOutput(model, metrics)
