"""GGUF language models: quantized by llama.cpp, gated on perplexity, run by llama.cpp.

Each llama.cpp quantization type (Q4_K_M, Q8_0, ...) is one recipe; a profile lists the
types to try in ``gguf.quant_types``, most compressed first.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from edge_runtime.cpus import usable_cpus
from edge_runtime.errors import ModelFileError
from edge_runtime.gguf import GGUF_FILE_TYPES, read_gguf
from edge_runtime.manifest import (
    LlamaCppBackendSpec,
    LlmMeasurements,
    LlmSpec,
    MemoryFit,
    TokenizerFacts,
    TokenSelfTestSpec,
)

from ..errors import DataError, FitError, ModelValidationError, PackagerError
from ..llm_eval import check_eval_text, read_eval_text, tokenize_text, windows
from .base import (
    Chosen,
    DataNeeds,
    DeviceRuntime,
    FormatPipeline,
    Gate,
    Measure,
    ProfileSection,
    Recipe,
    Step,
    recipes_by_name,
)

# llama.cpp quantization types by name (Q4_K_M, Q8_0, F16, ...) -> llama_ftype value
QUANT_TYPES = {
    name.removeprefix("MOSTLY_").removeprefix("ALL_"): value
    for value, name in GGUF_FILE_TYPES.items()
    if "GUESSED" not in name
}
# A story opening: small models continue it for many tokens instead of ending at once.
SELFTEST_PROMPT = "Once upon a time, in a small village by the sea,"
# Logit gap under which another CPU's kernels may flip the greedy choice (see manifest)
SELFTEST_TIE_MARGIN = 0.25
KV_BYTES_PER_VALUE = 2  # llama.cpp's default KV cache type is f16
COMPUTE_UBATCH = 512  # llama.cpp's default micro-batch, which sizes its compute buffer


def _unknown_type(name: str) -> str:
    return f"unknown llama.cpp quantization type {name!r}; known: {', '.join(sorted(QUANT_TYPES))}"


def check_quant_type(name: str) -> str:
    """``name`` if llama.cpp knows it; ValueError (pydantic names the key) otherwise."""
    if name not in QUANT_TYPES:
        raise ValueError(_unknown_type(name))
    return name


def read_source(path: Path):
    """The GGUF header, with llama.cpp-independent checks; ModelValidationError if bad."""
    try:
        return read_gguf(path)
    except ModelFileError as exc:
        raise ModelValidationError(str(exc)) from None


def _allow_requantize(settings, profile) -> dict[str, Any]:
    return {"allow_requantize": settings.allow_requantize}


RECIPES = recipes_by_name(
    *(
        Recipe(
            name,
            f"llama.cpp {name}",
            (Step("GgufQuantize", {"quant_type": name}, _allow_requantize),),
        )
        for name in QUANT_TYPES
    )
)


class GgufTargetConfig(ProfileSection):
    chain_field = "quant_types"

    quant_types: list[str] = Field(
        min_length=1,
        description="llama.cpp quantization types to try, most compressed first, e.g. "
        "[Q4_K_M, Q5_K_M, Q8_0]; the perplexity gate falls back along this chain",
    )
    threads: int = Field(0, ge=0, description="llama.cpp threads; 0 = one per core")

    @field_validator("quant_types")
    @classmethod
    def _known_types(cls, names: list[str]) -> list[str]:
        return [check_quant_type(name) for name in names]

    gpu_layers: int = Field(0, ge=-1, description="layers to offload to the GPU (-1 = all)")
    context_length: int = Field(2048, gt=0, description="context length the device will use")


def _eval_text(settings) -> Path | None:
    """The one --eval .txt (None: the shipped text); GGUF takes no second file."""
    if len(settings.eval) > 1:
        raise DataError(
            f"a GGUF build takes one --eval .txt, got {len(settings.eval)} files; join the "
            "texts into one file"
        )
    return settings.eval[0] if settings.eval else None


# Options of the tensor formats' gate and feeding, which a language model's perplexity
# gate has no use for: given to a GGUF build, they are refused rather than ignored.
TENSOR_ONLY_OPTIONS = (
    "calibration",
    "metric",
    "metric_plugin",
    "batch_axis",
    "constant",
    "state",
    "selftest_vectors",
)


def _check_text(pipeline: FormatPipeline, settings) -> None:
    if settings.tokenizer is not None:
        raise PackagerError(
            "--tokenizer: a GGUF model carries its own tokenizer in the file; leave it out"
        )
    from ..text import TEXT_OPTIONS

    given = [name for name in TENSOR_ONLY_OPTIONS if getattr(settings, name)]
    given += [name for name in TEXT_OPTIONS if getattr(settings, name) not in (None, {})]
    if settings.task not in ("auto", "generic"):
        given.insert(0, "task")
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise PackagerError(
            f"{flags}: ONNX and TFLite options; a GGUF build is gated on perplexity "
            "(--max-ppl-increase, --eval TEXT.txt). Leave them out."
        )
    check_eval_text(_eval_text(settings))


def _load_text(settings, facts: dict[str, Any], ctx) -> None:
    tokens = tokenize_text(settings.model, read_eval_text(_eval_text(settings)))
    ctx.eval_windows = windows(tokens, settings.llm_window)


def _memory_parts(info, model_bytes: int, context_length: int) -> dict[str, float]:
    """Weights, KV cache at ``context_length`` and compute buffers, in MB (an estimate)."""
    n_embd = int(info.arch_value("embedding_length", 0))
    n_head = int(info.arch_value("attention.head_count", 1)) or 1
    n_head_kv = int(info.arch_value("attention.head_count_kv", n_head))
    key_length = int(info.arch_value("attention.key_length", n_embd // n_head))
    value_length = int(info.arch_value("attention.value_length", n_embd // n_head))
    n_layer = int(info.arch_value("block_count", 0))
    kv_bytes = n_layer * context_length * n_head_kv * (key_length + value_length)
    kv_bytes *= KV_BYTES_PER_VALUE
    vocab = int(info.arch_value("vocab_size", 0)) or _vocab_size(info)
    # logits for one micro-batch plus a few activations of the widest layer
    compute_bytes = COMPUTE_UBATCH * 4 * (vocab + 8 * n_embd)
    return {
        "weights_mb": round(model_bytes / 2**20, 1),
        "kv_cache_mb": round(kv_bytes / 2**20, 1),
        "compute_mb": round(compute_bytes / 2**20, 1),
    }


def _vocab_size(info) -> int:
    tokens = info.metadata.get("tokenizer.ggml.tokens")
    return getattr(tokens, "length", None) or len(tokens or [])


def check_llm_fit(profile, model: Path, measurements: LlmMeasurements | None, facts) -> MemoryFit:
    """Weights plus KV cache plus compute against the budget; the measured peak if larger.

    Raises:
        FitError: the model needs more than the profile allows.
    """
    context_length = profile.gguf.context_length
    parts = _memory_parts(read_source(model), model.stat().st_size, context_length)
    required, basis = sum(parts.values()), "estimated"
    if measurements is not None and measurements.peak_memory_mb > required:
        required, basis = measurements.peak_memory_mb, "measured"
    fit = MemoryFit(
        budget_mb=float(profile.model_memory_budget_mb),
        required_mb=round(required, 1),
        basis=basis,
        parts=parts,
    )
    if fit.required_mb > fit.budget_mb:
        raise FitError(
            f"the model needs about {fit.required_mb:.0f} MB ({parts['weights_mb']:.0f} MB "
            f"weights, {parts['kv_cache_mb']:.0f} MB KV cache at {context_length} "
            f"tokens, {parts['compute_mb']:.0f} MB compute) but profile {profile.name!r} "
            f"allows {fit.budget_mb:.0f} MB; pick a smaller --quant type, a shorter "
            "context_length in the profile, or a smaller model"
        )
    return fit


def llm_spec(info, quant_type: str, source_type: str, profile) -> LlmSpec:
    meta = info.metadata
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    return LlmSpec(
        architecture=info.architecture,
        n_parameters=info.n_parameters,
        quant_type=quant_type,
        source_type=source_type,
        context_length=profile.gguf.context_length,
        trained_context_length=info.arch_value("context_length"),
        chat_template=meta.get("tokenizer.chat_template"),
        tokenizer=TokenizerFacts(
            model=str(meta.get("tokenizer.ggml.model", "unknown")),
            pre=meta.get("tokenizer.ggml.pre"),
            vocab_size=_vocab_size(info),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            add_bos_token=None if add_bos is None else bool(add_bos),
        ),
    )


def record_selftest(model: Path, count: int) -> TokenSelfTestSpec:
    """Greedy-decode the self-test prompt on the chosen model, with the runtime's own code."""
    from edge_runtime.backends.llamacpp import greedy_continuation, open_llama

    llm = open_llama(model, context_length=256, threads=usable_cpus().count)
    try:
        tokens, margins = greedy_continuation(llm, SELFTEST_PROMPT, count)
        text = llm.detokenize(tokens).decode(errors="replace")
    finally:
        llm.close()
    return TokenSelfTestSpec(
        prompt=SELFTEST_PROMPT,
        tokens=tokens,
        text=text,
        margins=[round(margin, 4) for margin in margins],
        tie_margin=SELFTEST_TIE_MARGIN,
    )


def _extra_manifest(chosen: Chosen, facts, settings, profile, progress) -> dict[str, Any]:
    progress(f"self-test: the first {settings.selftest_tokens} greedy tokens of a fixed prompt")
    return {
        "selftest": record_selftest(chosen.path, settings.selftest_tokens),
        "llm": llm_spec(read_source(chosen.path), chosen.precision, facts["source_type"], profile),
    }


def _rate(llm, tokens: list[int], one_at_a_time: bool) -> float:
    llm.reset()
    started = time.perf_counter()
    if one_at_a_time:
        for token in tokens:
            llm.eval([token])
    else:
        llm.eval(tokens)
    return len(tokens) / (time.perf_counter() - started)


def measure_loader(request: dict):
    """In the measuring worker, the way llama-bench measures.

    pp: ``pp_tokens`` prompt tokens evaluated as one batch from an empty context. tg:
    ``tg_tokens`` tokens evaluated one at a time from an empty context. Each is run once
    untimed, then ``repetitions`` times; the mean rate is reported. Token ids are random,
    as in llama-bench: speed does not depend on which tokens they are.
    """
    from edge_runtime.backends.llamacpp import open_llama

    pp_tokens, tg_tokens = request["pp_tokens"], request["tg_tokens"]
    llm = open_llama(
        Path(request["model"]),
        context_length=max(pp_tokens, tg_tokens),
        threads=request["threads"],
        batch=pp_tokens,
    )

    def bench() -> dict:
        pick = random.Random(0)
        vocab = llm.n_vocab()
        prompt = [pick.randrange(vocab) for _ in range(pp_tokens)]
        generated = [pick.randrange(vocab) for _ in range(tg_tokens)]
        _rate(llm, prompt, False), _rate(llm, generated[:8], True)  # warm-up, as llama-bench
        repetitions = request["repetitions"]
        pp = [_rate(llm, prompt, False) for _ in range(repetitions)]
        tg = [_rate(llm, generated, True) for _ in range(repetitions)]
        llm.close()
        return {
            "threads": request["threads"],
            "repetitions": repetitions,
            "pp_tokens": pp_tokens,
            "pp_tokens_per_s": round(sum(pp) / len(pp), 2),
            "tg_tokens": tg_tokens,
            "tg_tokens_per_s": round(sum(tg) / len(tg), 2),
        }

    return bench


def _verdict(name: str, metrics: dict, passed: bool) -> str:
    return (
        f"{name}: perplexity {metrics['perplexity']:.3f} (+{metrics['ppl_increase']:.2%}), "
        f"{'passed' if passed else 'failed'} the gate"
    )


PIPELINE = FormatPipeline(
    name="gguf",
    rank=1,  # profiles list onnx, gguf, tflite
    noun="a GGUF",
    suffixes=(".gguf",),
    engine="llamacpp",
    # llama-cpp-python loads its native libraries from llama_cpp/lib at run time
    device=DeviceRuntime(extra="llm", engine_package="llama_cpp", collect_all=True),
    profile_section=GgufTargetConfig,
    recipes=RECIPES,
    prepare=(
        Step(
            "GgufValidate",
            options=_allow_requantize,
            announce=lambda p: "validate: GGUF header, tensor bounds, source precision",
        ),
    ),
    data=DataNeeds(check=_check_text, load=_load_text),
    gate=Gate(
        step=Step("GgufEvaluate", options=lambda s, p: {"max_ppl_increase": s.max_ppl_increase}),
        threshold=lambda settings: settings.max_ppl_increase,
        metric=lambda task: "perplexity increase over the source (ppl / source_ppl - 1)",
        evaluating=lambda name, ctx: f"{name}: perplexity and KL divergence against the source",
        verdict=_verdict,
        reason=lambda metrics, limit: f"perplexity +{metrics['ppl_increase']:.2%} > +{limit:.2%}",
        refusal=lambda limit: (
            f"no quantization type met the perplexity gate (+{limit:.0%})",
            "Raise --max-ppl-increase, add a larger type (e.g. Q8_0) to the profile's "
            "quant_types, or check the evaluation text.",
        ),
        eval_samples=lambda metrics, ctx: int(metrics["scored_tokens"]),
    ),
    measure=Measure(
        step=Step("GgufMeasure"),
        figures=LlmMeasurements,
        worker_loader="packager.formats.gguf:measure_loader",
        announce="measure: prompt processing and generation tokens/s (llama-bench style)",
    ),
    fit=check_llm_fit,
    backend_spec=lambda profile: LlamaCppBackendSpec(
        intra_op_threads=profile.gguf.threads, gpu_layers=profile.gguf.gpu_layers
    ),
    extra_manifest=_extra_manifest,
    tool_distributions=("edgepack", "numpy", "llama_cpp_python", "gguf"),
    announce_recipe=lambda recipe: f"{recipe.name}: quantizing with llama.cpp",
    unknown_recipe=_unknown_type,
    package_announce="package: manifest, self-test tokens, signature",
    forced_by="quant",  # --quant Q4_K_M
)
