"""``BuildConfig``: what ``edgepack build`` was asked to do.

One schema for the library and the CLI: ``edgepack build``'s options are generated from
these fields (the description is the help text), so the two cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .profiles import DeviceProfile

TASKS = ("classification", "embedding", "detection", "dense", "sequence", "regression")


def key_values(value: Any, flag: str) -> Any:
    """``["NAME=VALUE", ...]`` (repeated flags) -> ``{NAME: "VALUE"}``; a dict passes."""
    if not isinstance(value, list | tuple):
        return value
    pairs = {}
    for item in value:
        name, sep, rest = str(item).partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"{flag} takes NAME=VALUE, got {item!r}")
        if name in pairs:
            raise ValueError(f"{flag} names {name!r} twice")
        pairs[name] = rest
    return pairs


class BuildConfig(BaseModel):
    """What ``edgepack build`` was asked to do."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model: Path = Field(description="Source model file (.onnx, .tflite or .gguf).")
    profile: DeviceProfile = Field(
        description="Device profile: a shipped one by name (see `edgepack profiles list`) "
        "or your own YAML."
    )
    key: Path = Field(
        description="Ed25519 private key (PEM) that signs the bundle (`edgepack keygen`)."
    )
    output: Path = Field(description="The .edgepkg file to write.")
    calibration: list[Path] = Field(
        default_factory=list,
        description=".npz keyed by input name, first axis = samples (for static int8); "
        "repeatable: one file per resolution of a dynamic-shape model.",
    )
    eval: list[Path] = Field(
        default_factory=list,
        description="ONNX and TFLite (required): held-out .npz in the same layout; an "
        "optional 'labels' array adds accuracy; repeatable: one file per resolution, the "
        "gate takes the worst. GGUF: one UTF-8 .txt for perplexity (default: a text "
        "shipped with edgepack).",
    )
    max_degradation: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Gate: largest allowed degradation of each output (a metric's own "
        "default yields to it when given; docs/quantization.md).",
    )
    quant: str | None = Field(
        None, description="GGUF: one llama.cpp type (e.g. Q4_K_M) instead of the chain."
    )
    allow_requantize: bool = Field(
        False,
        description="GGUF: accept an already-quantized source (it loses more; a warning is shown).",
    )
    max_ppl_increase: float = Field(
        0.10,
        ge=0,
        description="GGUF gate: largest allowed perplexity increase over the source (0.10 = +10%).",
    )
    llm_window: int = Field(512, ge=64, description="GGUF: tokens per perplexity window.")
    selftest_tokens: int = Field(
        16, ge=1, le=256, description="GGUF: greedy tokens recorded for the self-test."
    )
    with_wheels: bool = Field(
        False,
        description="Also write BUNDLE.wheels/: the runtime's wheels for the profile's "
        "platform, hashed in the signed manifest, for an offline install "
        "(scripts/install-on-device.sh).",
    )
    extra_wheels: Path | None = Field(
        None,
        description="Folder of wheels PyPI lacks for the platform (e.g. llama-cpp-python "
        "for aarch64).",
    )
    recipe: str | None = Field(None, description="Force one recipe instead of the profile's chain.")
    measure: bool = Field(
        True,
        description="Measure latency and memory on this host (--no-measure: reproducible bytes).",
    )
    speed_check: bool = Field(
        True,
        description="Time each quantized candidate that passes the gate against fp32 on this "
        "host, and refuse it when slower on a host of the profile's arch (docs/quantization.md, "
        "speed check). Off with --no-measure too.",
    )
    task: Literal[
        "auto",
        "classification",
        "embedding",
        "detection",
        "dense",
        "sequence",
        "regression",
        "generic",
    ] = Field(
        "auto",
        description="What the model is for; the gate scores each output with the task's "
        "metric (docs/quantization.md). auto: chosen per output from its shape and the data.",
    )
    metric: dict[str, str] = Field(
        default_factory=dict,
        description="OUTPUT=NAME: the gate metric for one output (repeatable), e.g. "
        "scores=classification; see docs/quantization.md for the names.",
    )
    metric_plugin: str | None = Field(
        None,
        description="module:function (or an 'edgepack.metrics' entry point name) that scores "
        "the candidate's outputs against the reference; see docs/quantization.md.",
    )
    batch_axis: dict[str, int] = Field(
        default_factory=dict,
        description="NAME=K: input NAME holds samples on axis K, not 0 (repeatable), e.g. "
        "a recurrent state [layers, batch, units].",
    )
    constant: dict[str, str] = Field(
        default_factory=dict,
        description="NAME=VALUE: feed input NAME this fixed value (a number or a JSON list) "
        "instead of taking it from the data files (repeatable), e.g. sr=16000.",
    )
    state: dict[str, str] = Field(
        default_factory=dict,
        description="INPUT=OUTPUT: input INPUT takes OUTPUT of the previous step (repeatable); "
        "each sample of the data files is then a sequence (a step axis after the sample "
        "axis), and the state starts at zeros or at the file's own INPUT array.",
    )
    selftest_vectors: int | None = Field(
        None,
        ge=1,
        description="Eval samples stored as self-test vectors (default: as many as fit in "
        "10% of the model or 1 MiB, at most 8).",
    )
    tokenizer: Path | None = Field(
        None,
        description="A Hugging Face tokenizer.json to carry in the bundle, so the device "
        "takes text (Runtime.embed, `edge-runtime run --text`, /v1/embeddings); for "
        "--task embedding (the default with it) or classification (docs/serve-openai.md).",
    )
    tokenizer_input: dict[str, str] = Field(
        default_factory=dict,
        description="ROLE=INPUT: the model input the tokenizer's input_ids, attention_mask "
        "or token_type_ids fill (repeatable); default: the inputs of those names.",
    )
    text_max_length: int | None = Field(
        None,
        ge=1,
        description="With --tokenizer: most tokens per text (default: the model's fixed "
        "sequence length, else the tokenizer's own truncation length, else 512).",
    )
    text_padding: Literal["longest", "max_length"] | None = Field(
        None,
        description="With --tokenizer: pad each batch to its longest text, or every text to "
        "--text-max-length (default: longest, or max_length for a fixed sequence length).",
    )
    text_truncation: bool | None = Field(
        None,
        description="With --tokenizer: cut longer texts to --text-max-length (default), or "
        "refuse them (--no-text-truncation).",
    )
    text_output: str | None = Field(
        None,
        description="With --tokenizer: the output holding the embedding or the scores "
        "(default: the only output, else one named like sentence_embedding or "
        "last_hidden_state).",
    )
    pooling: Literal["mean", "cls", "pooled"] | None = Field(
        None,
        description="With --tokenizer, embedding: mean of the token vectors over the "
        "attention mask, the first (CLS) token's, or the model's own pooled output "
        "(default: pooled for a [batch, dim] output, mean for [batch, tokens, dim]).",
    )
    name: str | None = Field(None, description="Bundle name (default: the model file's stem).")
    version: str = Field("0.1.0", description="Bundle version recorded in the manifest.")
    workdir: Path | None = Field(
        None,
        description="Folder for intermediate files, kept after the build (default: a "
        "temporary folder, removed).",
    )

    @field_validator("metric", "batch_axis", "constant", "state", "tokenizer_input", mode="before")
    @classmethod
    def _key_values(cls, value: Any, info) -> Any:
        return key_values(value, "--" + info.field_name.replace("_", "-"))

    @field_validator("calibration", "eval", mode="before")
    @classmethod
    def _path_list(cls, value: Any) -> Any:
        """One path (the library's older spelling) or None is a list of one or none."""
        if value is None:
            return []
        if isinstance(value, str | Path):
            return [value]
        return value
