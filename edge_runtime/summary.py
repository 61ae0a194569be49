"""One readable summary of a manifest, for every model format and schema version.

``edgepack inspect`` (on the host, signature not checked) and ``edge-runtime info`` (on
the device, after verification) both print ``summary_text``, so the two cannot drift.
Each row is a label and a value; what a row says depends on the manifest's ``kind`` and
``name`` discriminators, never on which attributes happen to exist.
"""

from __future__ import annotations

import json
from typing import Any

from .manifest import TEXT_INPUT_ROLES, Manifest

LABEL_WIDTH = 10
NOT_CHECKED = "not checked here (`edgepack verify` or `edge-runtime info` checks it)"


def summary_rows(manifest: Manifest, signed_by: str | None = None) -> list[tuple[str, str]]:
    """The summary as (label, value) rows, in display order.

    Args:
        manifest: a parsed manifest (schema 1 or 2).
        signed_by: the id of the key that verified the signature; None when it was not
            checked (``edgepack inspect``).
    """
    m = manifest
    rows = [
        ("bundle", f"{m.name} {m.version} ({m.bundle_id})"),
        ("signed by", signed_by or NOT_CHECKED),
        ("created", f"{m.created}, manifest schema {m.schema_version}"),
        ("target", f"{m.target.profile} ({m.target.arch}, accelerator {m.target.accelerator})"),
        *_backend_rows(m),
        ("model", _model_text(m)),
        *_signature_rows(m),
        ("gate", _gate_text(m)),
        *_output_score_rows(m),
        *_chosen_rows(m),
        (
            "memory",
            f"{m.memory.required_mb} MB ({m.memory.basis}) of {m.memory.budget_mb:.0f} MB",
        ),
    ]
    if m.text is not None:
        rows.append(("text", _text_text(m)))
    if m.measurements is not None:
        rows.append(("measured", _measured_text(m)))
    rows.append(("self-test", _selftest_text(m)))
    if m.steps:
        steps = " > ".join(f"{step.name} ({step.seconds:.1f}s)" for step in m.steps)
        rows.append(("steps", steps))
    if m.wheelhouse is not None:
        wheels = m.wheelhouse
        missing = f"; missing {', '.join(wheels.missing)}" if wheels.missing else ""
        rows.append(
            (
                "wheels",
                f"{wheels.folder}: {len(wheels.wheels)} wheels for {wheels.platform_tag}, "
                f"Python {wheels.python_version}{missing}",
            )
        )
    for entry in m.files:
        rows.append(("file", f"{entry.path} {entry.size} bytes sha256 {entry.sha256[:16]}..."))
    rows.append(("tools", ", ".join(f"{k} {v}" for k, v in sorted(m.tools.items()))))
    return rows


def summary_text(manifest: Manifest, signed_by: str | None = None) -> str:
    """``summary_rows`` as aligned plain-text lines, e.g. "target     raspberry-pi-4 (...)"."""
    return "\n".join(format_row(label, value) for label, value in summary_rows(manifest, signed_by))


def format_row(label: str, value: str) -> str:
    return f"{label:<{LABEL_WIDTH}} {value}"


def summary_json(manifest_bytes: bytes, signed_by: str) -> str:
    """What ``edge-runtime info --json`` prints: the signer and the manifest as signed."""
    document: dict[str, Any] = {"signed_by": signed_by, "manifest": json.loads(manifest_bytes)}
    return json.dumps(document, indent=2, ensure_ascii=False)


def _backend_rows(m: Manifest) -> list[tuple[str, str]]:
    spec = m.backend
    if spec.name == "onnx":
        providers = ", ".join(spec.providers) or "ONNX Runtime's default"
        threads = spec.intra_op_threads or "ONNX Runtime's choice of"
        return [
            ("backend", f"onnx: {providers}"),
            (
                "session",
                f"{threads} threads, CPU memory arena {_on(spec.enable_cpu_mem_arena)}, "
                f"spinning {_on(spec.allow_spinning)}",
            ),
        ]
    if spec.name == "tflite":
        return [("backend", f"tflite: {spec.tflite_settings()}")]
    return [("backend", "llamacpp")]  # its settings are on the context row


def _model_text(m: Manifest) -> str:
    text = f"{m.model.path}: {m.model.recipe} ({m.model.precision})"
    if m.model.format == "onnx":
        return f"{text}, opset {m.model.opset}"
    if m.model.format == "tflite":
        return f"{text}, signature {m.model.signature}"
    return f"{text}, GGUF"


def _feeding_text(m: Manifest) -> str:
    """e.g. "sr = 16000 (constant); state: batch axis 1; state <- stateN (per step)"."""
    feeding = m.feeding
    parts = [
        f"{name} = {json.dumps(value)} (constant)" for name, value in feeding.constants.items()
    ]
    axes = {**feeding.batch_axes, **feeding.output_batch_axes}
    parts += [f"{name}: batch axis {axis}" for name, axis in axes.items()]
    parts += [f"{name} <- {output} (per step)" for name, output in feeding.state.items()]
    return "; ".join(parts) or "as declared"


def _signature_rows(m: Manifest) -> list[tuple[str, str]]:
    if m.llm is None:
        rows = [
            ("inputs", m.signature_text(m.inputs)),
            ("outputs", m.signature_text(m.outputs)),
        ]
        if m.feeding is not None:
            rows.append(("feeding", _feeding_text(m)))
        return rows
    llm = m.llm
    return [
        (
            "llm",
            f"{llm.architecture}, {llm.n_parameters / 1e6:.0f}M parameters, "
            f"{llm.quant_type} from {llm.source_type}",
        ),
        (
            "context",
            f"{llm.context_length} tokens, {m.backend.gpu_layers} GPU layers, "
            f"{_threads(m.backend)} threads",
        ),
        ("chat", "template included" if llm.chat_template else "no template"),
    ]


def _threads(spec) -> str:
    return str(spec.intra_op_threads or "all")


def _gate_text(m: Manifest) -> str:
    q = m.quantization
    attempts = ", ".join(f"{attempt.recipe} {attempt.status}" for attempt in q.attempts)
    return f"{q.gate_metric} <= {q.max_degradation} on {q.eval_samples} samples; {attempts}"


def _output_score_rows(m: Manifest) -> list[tuple[str, str]]:
    """One row per output score of the chosen attempt: metric, degradation, threshold."""
    q = m.quantization
    chosen = next((a for a in q.attempts if a.recipe == q.chosen and a.outputs), None)
    if chosen is None:
        return []
    rows = []
    for score in chosen.outputs:
        output = "whole model" if score.output == "*" else score.output
        where = f" on {score.eval_file}" if score.eval_file else ""
        verdict = "passed" if score.passed else "failed"
        rows.append(
            (
                "output",
                f"{output}: {score.metric}, degradation {score.degradation:.4g}, limit "
                f"{score.threshold:g}{where}, {verdict}",
            )
        )
    return rows


def _chosen_rows(m: Manifest) -> list[tuple[str, str]]:
    """The chosen attempt's speed against float on the build host, and the nodes a mixed
    precision recipe kept in float."""
    q = m.quantization
    chosen = next((a for a in q.attempts if a.recipe == q.chosen and a.status == "passed"), None)
    if chosen is None:
        return []
    rows = []
    if chosen.speed is not None:
        speed = chosen.speed
        note = "" if speed.representative else ", host not representative of the target"
        rows.append(
            (
                "speed",
                f"{speed.ratio:.2f}x fp32 on the build host ({speed.candidate_ms:.3g} ms vs "
                f"{speed.reference_ms:.3g} ms{note})",
            )
        )
    if chosen.excluded_nodes:
        names = chosen.excluded_nodes
        shown = ", ".join(names[:6]) + (f", ... ({len(names) - 6} more)" if len(names) > 6 else "")
        rows.append(("kept float", f"{len(names)} nodes: {shown}"))
    return rows


def _measured_text(m: Manifest) -> str:
    figures = m.measurements
    if figures.kind == "llm":
        return (
            f"pp{figures.pp_tokens} {figures.pp_tokens_per_s:.1f} tokens/s, "
            f"tg{figures.tg_tokens} {figures.tg_tokens_per_s:.1f} tokens/s "
            f"({figures.threads} threads), peak {figures.peak_memory_mb:.1f} MB on {figures.host}"
        )
    return (
        f"p50 {figures.latency_ms_p50:.3g} ms, p95 {figures.latency_ms_p95:.3g} ms, "
        f"peak {figures.peak_memory_mb:.1f} MB on {figures.host}"
    )


def _selftest_text(m: Manifest) -> str:
    spec = m.selftest
    if spec.kind == "greedy-tokens":
        return (
            f"{len(spec.tokens)} greedy tokens after {spec.prompt!r}, "
            f"near-tie margin {spec.tie_margin:g}"
        )
    return f"{spec.count} vectors, atol {spec.atol:.3g}, min cosine {spec.min_cosine}"


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _text_text(m: Manifest) -> str:
    """e.g. "tokenizer/tokenizer.json -> input_ids, attention_mask; up to 128 tokens
    (padded to longest, truncated); embedding: mean of last_hidden_state over the
    attention mask, normalised"."""
    text = m.text
    filled = [text.inputs[role] for role in TEXT_INPUT_ROLES if role in text.inputs]
    cut = "truncated" if text.truncation else "longer refused"
    if text.task == "embedding":
        norm = ", normalised" if text.normalize else ""
        pooled = {
            "mean": f"mean of {text.output} over the attention mask",
            "cls": f"{text.output} of the first token",
            "pooled": f"{text.output}, pooled by the model",
        }[text.pooling]
        task = f"embedding: {pooled}{norm}"
    else:
        task = f"classification: scores in {text.output}"
    return (
        f"{text.tokenizer} -> {', '.join(filled)}; up to {text.max_length} "
        f"tokens (padded to {text.padding}, {cut}); {task}"
    )
