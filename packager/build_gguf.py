"""``build_bundle`` for GGUF language models.

Validate -> tokenize the evaluation text -> for each llama.cpp type in the chain:
quantize, score perplexity and KL against the source, gate -> measure pp/tg -> check
that weights plus KV cache fit -> record the greedy self-test -> package.
"""

from __future__ import annotations

import contextlib
import os
import time
from importlib import metadata
from pathlib import Path

from edge_runtime.manifest import (
    Attempt,
    LlamaCppBackendSpec,
    LlmMeasurements,
    LlmSpec,
    MemoryFit,
    QuantizationRecord,
    TokenizerFacts,
    TokenSelfTestSpec,
)

from .errors import DataError, FitError, GateError, PackagerError
from .passes import ModelArtifact, Package, PassContext
from .passes.base import PassFailedError
from .passes.evaluate import SOURCE_KEY
from .passes.gguf import (
    TOKENS_KEY,
    GgufEvaluate,
    GgufMeasure,
    GgufQuantize,
    GgufValidate,
    check_quant_type,
    read_source,
)
from .passes.package import REQUEST_KEY, PackageRequest
from .profiles import DeviceProfile

DEFAULT_EVAL_TEXT = Path(__file__).parent / "examples" / "llm_eval.txt"
# A story opening: small models continue it for many tokens instead of ending at once.
SELFTEST_PROMPT = "Once upon a time, in a small village by the sea,"
# Logit gap under which another CPU's kernels may flip the greedy choice (see manifest)
SELFTEST_TIE_MARGIN = 0.25
KV_BYTES_PER_VALUE = 2  # llama.cpp's default KV cache type is f16
COMPUTE_UBATCH = 512  # llama.cpp's default micro-batch, which sizes its compute buffer


def resolve_quant_chain(profile: DeviceProfile, forced: str | None) -> list[str]:
    """The llama.cpp types to try, checked before any work. PackagerError if unknown."""
    names = [forced] if forced else list(profile.gguf.quant_types)
    for name in names:
        try:
            check_quant_type(name)
        except ValueError as exc:
            raise PackagerError(str(exc)) from None
    return names


def read_eval_text(path: Path | None) -> str:
    path = path or DEFAULT_EVAL_TEXT
    if path.suffix.lower() != ".txt":
        raise DataError(f"{path.name}: for a GGUF model, --eval takes a UTF-8 .txt file")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"evaluation text {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from None


def llm_memory_parts(info, model_bytes: int, context_length: int) -> dict[str, float]:
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


def check_llm_fit(profile: DeviceProfile, parts: dict[str, float], measured_mb: float | None):
    required = sum(parts.values())
    basis = "estimated"
    if measured_mb is not None and measured_mb > required:
        required, basis = measured_mb, "measured"
    fit = MemoryFit(
        budget_mb=float(profile.model_memory_budget_mb),
        required_mb=round(required, 1),
        basis=basis,
        parts=parts,
    )
    if fit.required_mb > fit.budget_mb:
        raise FitError(
            f"the model needs about {fit.required_mb:.0f} MB ({parts['weights_mb']:.0f} MB "
            f"weights, {parts['kv_cache_mb']:.0f} MB KV cache at {profile.gguf.context_length} "
            f"tokens, {parts['compute_mb']:.0f} MB compute) but profile {profile.name!r} "
            f"allows {fit.budget_mb:.0f} MB; pick a smaller --quant type, a shorter "
            "context_length in the profile, or a smaller model"
        )
    return fit


def llm_spec(info, quant_type: str, source_type: str, profile: DeviceProfile) -> LlmSpec:
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

    llm = open_llama(model, context_length=256, threads=os.cpu_count() or 1)
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


def _try_chain(config, ctx, chain, source: ModelArtifact, progress):
    attempts: list[Attempt] = []
    for quant_type in chain:
        progress(f"{quant_type}: quantizing with llama.cpp")
        try:
            quantized, _ = GgufQuantize(
                {"quant_type": quant_type, "allow_requantize": config.allow_requantize}
            ).run(source, ctx)
            progress(f"{quant_type}: perplexity and KL divergence against the source")
            evaluated, _ = GgufEvaluate({"max_ppl_increase": config.max_ppl_increase}).run(
                quantized.artifact, ctx
            )
        except PassFailedError as exc:
            attempts.append(Attempt(recipe=quant_type, status="error", reason=str(exc)[:500]))
            progress(f"{quant_type}: error: {exc}")
            continue
        metrics = dict(evaluated.metrics)
        passed = bool(metrics.pop("passed"))
        increase = metrics["ppl_increase"]
        attempts.append(
            Attempt(
                recipe=quant_type,
                status="passed" if passed else "failed",
                reason=None
                if passed
                else f"perplexity +{increase:.2%} > +{config.max_ppl_increase:.2%}",
                metrics=metrics,
                size_bytes=quantized.artifact.path.stat().st_size,
            )
        )
        progress(
            f"{quant_type}: perplexity {metrics['perplexity']:.3f} (+{increase:.2%}), "
            f"{'passed' if passed else 'failed'} the gate"
        )
        if passed:
            return attempts, quantized.artifact, metrics
    raise GateError(
        f"no quantization type met the perplexity gate (+{config.max_ppl_increase:.0%}): "
        + "; ".join(f"{a.recipe}: {a.status} ({a.reason})" for a in attempts)
        + ". Raise --max-ppl-increase, add a larger type (e.g. Q8_0) to the profile's "
        "quant_types, or check the evaluation text.",
        attempts,
    )


def build_gguf_bundle(config, ctx: PassContext, progress, started: float, created_epoch: int):
    """The GGUF half of ``packager.build.build_bundle`` (which owns the work folder)."""
    from .build import BuildResult, attach_wheelhouse, tool_versions
    from .llm_eval import tokenize_text, windows

    profile = config.profile
    chain = resolve_quant_chain(profile, config.quant)
    source = ModelArtifact(config.model, "gguf")
    progress("validate: GGUF header, tensor bounds, source precision")
    validated, _ = GgufValidate({"allow_requantize": config.allow_requantize}).run(source, ctx)
    source_type = validated.metrics["source_type"]
    text = read_eval_text(config.eval)
    tokens = tokenize_text(config.model, text)
    ctx.cache[TOKENS_KEY] = windows(tokens, config.llm_window)
    ctx.cache[SOURCE_KEY] = config.model

    attempts, chosen, chosen_metrics = _try_chain(config, ctx, chain, validated.artifact, progress)
    chosen_info = read_source(chosen.path)

    measurements = None
    if config.measure:
        progress("measure: prompt processing and generation tokens/s (llama-bench style)")
        measured, _ = GgufMeasure().run(chosen, ctx)
        measurements = LlmMeasurements(**measured.metrics)
    parts = llm_memory_parts(chosen_info, chosen.path.stat().st_size, profile.gguf.context_length)
    memory = check_llm_fit(profile, parts, measurements.peak_memory_mb if measurements else None)

    progress(f"self-test: the first {config.selftest_tokens} greedy tokens of a fixed prompt")
    selftest = record_selftest(chosen.path, config.selftest_tokens)
    quantization = QuantizationRecord(
        chosen=chosen.precision,
        gate_metric="perplexity increase over the source (ppl / source_ppl - 1)",
        max_degradation=config.max_ppl_increase,
        eval_samples=int(chosen_metrics["scored_tokens"]),
        attempts=attempts,
    )
    tools = tool_versions()
    for dist in ("llama_cpp_python", "gguf"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            tools[dist] = metadata.version(dist)
    ctx.cache[REQUEST_KEY] = PackageRequest(
        output=config.output,
        key=config.key,
        name=config.name or config.model.stem,
        version=config.version,
        created_epoch=created_epoch,
        inputs=[],
        outputs=[],
        opset=None,
        recipe=chosen.precision,
        chosen_metrics=chosen_metrics,
        quantization=quantization,
        memory=memory,
        measurements=measurements,
        tools=tools,
        backend=LlamaCppBackendSpec(
            intra_op_threads=profile.gguf.threads,
            gpu_layers=profile.gguf.gpu_layers,
        ),
        selftest=selftest,
        llm=llm_spec(chosen_info, chosen.precision, source_type, profile),
    )
    attach_wheelhouse(config, ctx, progress)
    progress("package: manifest, self-test tokens, signature")
    packaged, _ = Package().run(chosen, ctx)
    return BuildResult(config.output, packaged.metrics["manifest"], time.perf_counter() - started)
