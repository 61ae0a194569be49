"""The bundle manifest: one typed model, shared by the packager (writer) and the runtime.

Unknown keys are rejected everywhere, so a manifest from a newer, incompatible edgepack
fails loudly instead of being half understood. ``schema_version`` gates compatibility.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import BundleError
from .limits import NAME_RULE, dtype_problem, path_problem

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MAX_MANIFEST_BYTES = 8 * 1024 * 1024  # refuse to parse anything bigger: a manifest is small
# Members every bundle has besides its files: no file may take (or hide under) their names.
RESERVED_NAMES = (MANIFEST_NAME, SIGNATURE_NAME)


# The engine that runs each model format (also the name of its edge_runtime backend).
ENGINE_OF_FORMAT = {"onnx": "onnx", "tflite": "tflite", "gguf": "llamacpp"}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileRole(str, Enum):
    MODEL = "model"
    SELFTEST = "selftest"
    EXTRA = "extra"


class FileEntry(StrictModel):
    path: str = Field(description="POSIX path of the member inside the archive")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    role: FileRole

    @field_validator("path")
    @classmethod
    def _safe_path(cls, path: str) -> str:
        problem = path_problem(path)
        if problem is not None:
            raise ValueError(f"{path!r} cannot name a member: {problem}; {NAME_RULE}")
        return path


class TensorSpec(StrictModel):
    name: str
    dtype: str = Field(description="numpy dtype name, e.g. float32, int64")
    shape: list[int | str] = Field(description="fixed sizes, or a name for a free dimension")

    @field_validator("shape")
    @classmethod
    def _sizes_are_sizes(cls, shape: list[int | str]) -> list[int | str]:
        if any(isinstance(dim, int) and dim < 0 for dim in shape):
            raise ValueError(f"{shape}: a size is at least 0 (a free dimension is a name)")
        return shape

    def describe(self) -> str:
        dims = ", ".join(str(dim) for dim in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


class FeedingSpec(StrictModel):
    """How the model is fed beyond its plain signature (``edge_runtime.feeding``).

    Real models take more than a batch on axis 0: a recurrent state may hold its batch on
    another axis, an input may be a fixed value (a sample rate), and a stateful model
    takes each step's state from the previous step's output. The build records what it
    was told, so the device feeds the model as the gate did.
    """

    constants: dict[str, Any] = Field(
        default_factory=dict,
        description="input name -> its fixed value (a number, or nested lists in the "
        "input's shape), already cast to the input's dtype; filled in when a caller omits it",
    )
    batch_axes: dict[str, int] = Field(
        default_factory=dict, description="input name -> its batch axis, where it is not 0"
    )
    output_batch_axes: dict[str, int] = Field(
        default_factory=dict, description="output name -> its batch axis, where it is not 0"
    )
    state: dict[str, str] = Field(
        default_factory=dict,
        description="input name -> the output that feeds it at the next step (a sample "
        "is a sequence of steps; the state starts at zeros or at the sample's own value)",
    )


# The model inputs a tokenizer fills, by what each holds (an input's name may differ).
TEXT_INPUT_ROLES = ("input_ids", "attention_mask", "token_type_ids")


class TextSpec(StrictModel):
    """Text in: a Hugging Face ``tokenizer.json`` in the bundle turns text into the model's
    inputs (``edge_runtime.text``), and the task says what the outputs mean.

    An embedding is the ``output`` pooled over the tokens (``mean`` over the attention
    mask, the first token's ``cls``, or ``pooled`` when the model already pools), then
    L2-normalised when ``normalize``; a classifier's ``output`` holds its scores.
    """

    tokenizer: str = Field(description="the tokenizer.json member, listed among the files")
    inputs: dict[Literal["input_ids", "attention_mask", "token_type_ids"], str] = Field(
        description="what the tokenizer gives -> the model input it fills"
    )
    max_length: int = Field(ge=1, description="most tokens per text, special tokens included")
    padding: Literal["longest", "max_length"] = Field(
        description="pad a batch to its longest text, or every text to max_length"
    )
    truncation: bool = Field(
        description="cut a longer text to max_length; else such a text is refused"
    )
    pad_id: int = Field(ge=0, description="the token id padding positions hold")
    pad_token: str = Field(description="the padding token's text")
    task: Literal["embedding", "classification"]
    output: str = Field(description="the model output the task reads")
    pooling: Literal["mean", "cls", "pooled"] | None = Field(
        None, description="embedding: how token vectors become one vector per text"
    )
    normalize: bool = Field(True, description="embedding: L2-normalise each vector")

    @model_validator(mode="after")
    def _consistent(self) -> TextSpec:
        if "input_ids" not in self.inputs:
            raise ValueError("text.inputs must name the model input that takes input_ids")
        if (self.task == "embedding") != (self.pooling is not None):
            raise ValueError("text.pooling is required for embedding and only for it")
        return self


class Target(StrictModel):
    profile: str
    arch: str
    accelerator: str
    platform_tag: str


class OnnxBackendSpec(StrictModel):
    """How ONNX Runtime runs the model (from the profile's ``onnx`` section)."""

    name: Literal["onnx"] = "onnx"
    providers: list[str] = Field(default_factory=list, description="execution providers, in order")
    intra_op_threads: int = Field(0, ge=0, description="0 = ONNX Runtime's choice")
    enable_cpu_mem_arena: bool = Field(False, description="ONNX Runtime's CPU memory arena")
    allow_spinning: bool = Field(False, description="worker threads spin-wait between ops")


class TfliteBackendSpec(StrictModel):
    """How LiteRT runs the model (from the profile's ``tflite`` section)."""

    name: Literal["tflite"] = "tflite"
    intra_op_threads: int = Field(0, ge=0, description="0 = LiteRT's choice")
    xnnpack: bool = Field(True, description="apply the XNNPACK CPU delegate")

    def tflite_settings(self) -> str:
        """How a TFLite bundle runs, in words, e.g. "XNNPACK on, 4 threads"."""
        threads = self.intra_op_threads or "LiteRT's choice of"
        return f"XNNPACK {'on' if self.xnnpack else 'off'}, {threads} threads"


class LlamaCppBackendSpec(StrictModel):
    """How llama.cpp runs the model (from the profile's ``gguf`` section)."""

    name: Literal["llamacpp"] = "llamacpp"
    intra_op_threads: int = Field(0, ge=0, description="0 = every core")
    gpu_layers: int = Field(0, ge=-1, description="layers offloaded to the GPU; -1 = all")


# One typed spec per engine, chosen by ``name``.
BackendSpec = Annotated[
    OnnxBackendSpec | TfliteBackendSpec | LlamaCppBackendSpec, Field(discriminator="name")
]


class ServingSpec(StrictModel):
    """How ``edge-runtime serve`` batches this model (from the profile's ``serving``
    section); flags on the device override it."""

    max_batch_size: int = Field(
        1, ge=1, description="most concurrent requests stacked into one run; 1 = no batching"
    )
    max_queue_delay_ms: float = Field(
        0.0, ge=0, le=1000, description="longest a request waits for others to batch with"
    )


class ModelSpec(StrictModel):
    path: str
    format: Literal["onnx", "tflite", "gguf"]
    opset: int | None = None
    precision: str
    recipe: str
    signature: str | None = Field(None, description="TFLite: the signature the inputs come from")


class OutputScore(StrictModel):
    """How the gate judged one output tensor of a candidate (or one eval file of it)."""

    output: str
    metric: str  # e.g. "cosine-tokens", "top1", "detection", "relative-error", a plugin
    degradation: float  # 0 = identical to the reference; the gate compares it to threshold
    threshold: float
    passed: bool
    eval_file: str | None = None  # with several eval files, the one these figures are from
    figures: dict[str, float] = Field(default_factory=dict)


class SpeedCheck(StrictModel):
    """The candidate's host latency against the float model's, measured side by side."""

    candidate_ms: float
    reference_ms: float
    ratio: float  # reference_ms / candidate_ms: above 1 = faster than float
    representative: bool  # the host shares the profile's instruction-set class


class Attempt(StrictModel):
    recipe: str
    status: Literal["passed", "failed", "skipped", "error"]
    reason: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    size_bytes: int | None = None
    outputs: list[OutputScore] = Field(default_factory=list)
    excluded_nodes: list[str] = Field(default_factory=list)  # kept in float (mixed precision)
    speed: SpeedCheck | None = None


class QuantizationRecord(StrictModel):
    chosen: str
    gate_metric: str
    max_degradation: float
    eval_samples: int
    attempts: list[Attempt]
    task: str | None = None  # the --task the gate judged for (None: older bundles)


class Measurements(StrictModel):
    """Host timing of a tensor model: latency per call and peak memory."""

    kind: Literal["tensor"] = "tensor"
    host: str
    runs: int
    latency_ms_p50: float
    latency_ms_p95: float
    peak_memory_mb: float
    load_seconds: float


class LlmMeasurements(StrictModel):
    """llama-bench style figures: prompt processing (pp) and token generation (tg)."""

    kind: Literal["llm"] = "llm"
    host: str
    threads: int
    repetitions: int
    pp_tokens: int
    pp_tokens_per_s: float
    tg_tokens: int
    tg_tokens_per_s: float
    peak_memory_mb: float
    load_seconds: float


class TokenizerFacts(StrictModel):
    model: str = Field(description="tokenizer.ggml.model, e.g. gpt2 (BPE) or llama (SPM)")
    pre: str | None = None
    vocab_size: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos_token: bool | None = None


class LlmSpec(StrictModel):
    """Facts about a GGUF language model that the device needs before generating."""

    architecture: str
    n_parameters: int
    quant_type: str = Field(description="the llama.cpp type the bundle's model was quantized to")
    source_type: str = Field(description="precision of the model the packager started from")
    context_length: int = Field(gt=0, description="context length the device runs with")
    trained_context_length: int | None = None
    chat_template: str | None = Field(None, description="the model's own Jinja chat template")
    tokenizer: TokenizerFacts


class MemoryFit(StrictModel):
    budget_mb: float
    required_mb: float
    basis: Literal["measured", "estimated"]
    parts: dict[str, float] = Field(default_factory=dict, description="the estimate's terms, MB")


class SelfTestBound(StrictModel):
    """One output's bound: every element within ``atol + rtol * |reference|`` of the
    stored reference, and each vector's cosine to it at least ``min_cosine``."""

    atol: float = Field(gt=0, description="abs difference allowed everywhere")
    rtol: float = Field(0.0, ge=0, description="further difference, per unit of |reference|")
    min_cosine: float = Field(description="min cosine similarity per vector")
    scale: float = Field(0.0, ge=0, description="max |reference| over the vectors (atol's unit)")
    kernel_spread: float = Field(
        0.0, ge=0, description="max |difference| between two kernel paths on the build host"
    )
    alternate: bool = Field(
        False,
        description="the vectors also hold this output from the host's second kernel path "
        "(alternate.NAME); a vector within the bound of either reference passes",
    )


class SelfTestSpec(StrictModel):
    """Tensor self-test: stored inputs and reference outputs, with tolerances.

    Bundles before per-output bounds store the fp32 source model's outputs and one
    ``atol``/``min_cosine`` for all outputs (``reference: source``, ``outputs`` empty).
    Newer ones store the bundled model's own outputs on the build host with a bound per
    output (``reference: model``); ``atol`` and ``min_cosine`` then hold the loosest.
    """

    kind: Literal["tensors"] = "tensors"
    path: str
    count: int = Field(ge=1)
    atol: float = Field(gt=0, description="max abs difference to the reference")
    min_cosine: float = Field(description="min cosine similarity to the reference")
    reference: Literal["source", "model"] = Field(
        "source", description="whose outputs the vectors hold: the fp32 source's or the model's"
    )
    outputs: dict[str, SelfTestBound] = Field(
        default_factory=dict, description="per-output bounds (empty: atol and min_cosine)"
    )

    def bound(self, output: str) -> SelfTestBound:
        """The bound ``output`` is checked against (the spec-wide one for older bundles)."""
        found = self.outputs.get(output)
        return found or SelfTestBound(atol=self.atol, min_cosine=self.min_cosine)


class TokenSelfTestSpec(StrictModel):
    """Greedy self-test for language models: the first tokens of a fixed prompt.

    ``margins`` holds, per token, the host's logit gap between the chosen token and the
    runner-up. Another CPU's kernels may swap a near-tie; a mismatch where the host's gap
    was below ``tie_margin`` ends the comparison instead of failing it.
    """

    kind: Literal["greedy-tokens"] = "greedy-tokens"
    prompt: str
    tokens: list[int] = Field(min_length=1)
    text: str = Field(description="the tokens as text, for people")
    margins: list[float]
    tie_margin: float = Field(ge=0)

    @model_validator(mode="after")
    def _lengths_agree(self) -> TokenSelfTestSpec:
        if len(self.margins) != len(self.tokens):
            raise ValueError("margins and tokens differ in length")
        return self


class WheelEntry(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.+!-]+\.whl$", description="file name in the folder")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class WheelhouseSpec(StrictModel):
    """Wheels for an offline install on the device, in a folder beside the bundle."""

    folder: str = Field(description="the wheelhouse folder's name, beside the bundle")
    platform_tag: str
    python_version: str
    requirements: list[str]
    wheels: list[WheelEntry]
    missing: list[str] = Field(
        default_factory=list, description="requirements PyPI has no wheel for on this platform"
    )


class StepRecord(StrictModel):
    """One packager pass that produced the bundle's model, in order."""

    name: str
    config: dict[str, Any] = Field(default_factory=dict)
    seconds: float = Field(ge=0)
    output_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


class Manifest(StrictModel):
    schema_version: Literal[1, 2] = Field(
        description="2 is written; 1 is read (upgraded in memory, the signed bytes unchanged)"
    )
    bundle_id: str
    name: str
    version: str
    created: str
    target: Target
    backend: BackendSpec
    model: ModelSpec
    files: list[FileEntry]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    quantization: QuantizationRecord
    memory: MemoryFit
    measurements: Annotated[Measurements | LlmMeasurements, Field(discriminator="kind")] | None = (
        None
    )
    selftest: Annotated[SelfTestSpec | TokenSelfTestSpec, Field(discriminator="kind")]
    tools: dict[str, str]
    llm: LlmSpec | None = None
    wheelhouse: WheelhouseSpec | None = None
    steps: list[StepRecord] = Field(
        default_factory=list, description="the packager passes behind the model (v2)"
    )
    feeding: FeedingSpec | None = Field(
        None, description="constant inputs, batch axes and carried state (tensor models)"
    )
    serving: ServingSpec | None = Field(
        None, description="dynamic batching for `edge-runtime serve` (None: no batching)"
    )
    text: TextSpec | None = Field(
        None, description="text pre-processing: the bundled tokenizer and the task"
    )

    @model_validator(mode="after")
    def _paths_are_listed(self) -> Manifest:
        listed = {entry.path for entry in self.files}
        paths = [("model", self.model.path)]
        if self.selftest.kind == "tensors":
            paths.append(("selftest", self.selftest.path))
        if (self.model.format == "gguf") != (self.llm is not None):
            raise ValueError("the llm section is required for gguf models and only for them")
        engine = ENGINE_OF_FORMAT[self.model.format]
        if self.backend.name != engine:
            raise ValueError(
                f"a {self.model.format} model runs on backend {engine!r}, not {self.backend.name!r}"
            )
        for role, path in paths:
            if path not in listed:
                raise ValueError(f"{role} path {path!r} is not among the manifest's files")
        return self

    @model_validator(mode="after")
    def _text_names_exist(self) -> Manifest:
        text = self.text
        if text is None:
            return self
        if self.model.format == "gguf":
            raise ValueError(
                "a gguf model carries its own tokenizer; the text section is not for it"
            )
        if text.tokenizer not in {entry.path for entry in self.files}:
            raise ValueError(f"text.tokenizer {text.tokenizer!r} is not among the manifest's files")
        inputs = {spec.name: spec for spec in self.inputs}
        outputs = {spec.name: spec for spec in self.outputs}
        for role, name in text.inputs.items():
            if name not in inputs:
                raise ValueError(f"text.inputs.{role} names input {name!r}, which the model lacks")
        if text.output not in outputs:
            raise ValueError(f"text.output names output {text.output!r}, which the model lacks")
        return self

    @model_validator(mode="after")
    def _files_do_not_collide(self) -> Manifest:
        # Case-folded: on a case-insensitive filesystem (macOS, Windows) 'Model' is 'model'.
        taken: dict[str, str] = {name.casefold(): name for name in RESERVED_NAMES}
        for entry in self.files:
            key = entry.path.casefold()
            if key in taken:
                raise ValueError(f"files list {entry.path!r}, which collides with {taken[key]!r}")
            taken[key] = entry.path
        for entry in self.files:
            parts = entry.path.casefold().split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(parts[:depth])
                if folder in taken:
                    raise ValueError(
                        f"files list {taken[folder]!r} as a file and {entry.path!r} inside it "
                        "as a folder; a path cannot be both"
                    )
        return self

    @model_validator(mode="after")
    def _tensors_are_plain(self) -> Manifest:
        for role, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [spec.name for spec in specs]
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                raise ValueError(f"{role} name {twice} more than once; each name is one tensor")
            for spec in specs:
                problem = dtype_problem(spec.dtype)
                if problem is not None:
                    raise ValueError(f"{role[:-1]} {spec.name!r}: {problem}")
        return self

    @model_validator(mode="after")
    def _feeding_names_exist(self) -> Manifest:
        feeding = self.feeding
        if feeding is None:
            return self
        inputs = {spec.name for spec in self.inputs}
        outputs = {spec.name for spec in self.outputs}
        named = [*feeding.constants, *feeding.batch_axes, *feeding.state]
        for name in named:
            if name not in inputs:
                raise ValueError(f"feeding names input {name!r}, which the model does not have")
        for name in [*feeding.output_batch_axes, *feeding.state.values()]:
            if name not in outputs:
                raise ValueError(f"feeding names output {name!r}, which the model does not have")
        return self

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise BundleError(f"manifest lists no file {path!r}")

    def signature_text(self, items: list[TensorSpec]) -> str:
        return ", ".join(spec.describe() for spec in items)

    def to_bytes(self) -> bytes:
        """Canonical JSON: sorted keys, fixed separators, so signing is reproducible."""
        return canonical_json(self.model_dump(mode="json"))


def canonical_json(data: Any) -> bytes:
    return (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()


def parse_manifest(raw: bytes) -> Manifest:
    """Parse and validate manifest bytes.

    Raises:
        BundleError: when the bytes are not a valid manifest of a supported schema version.
    """
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"manifest is {len(raw)} bytes; the limit is {MAX_MANIFEST_BYTES}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"manifest is not valid JSON: {exc}") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version not in READABLE_VERSIONS:
        raise BundleError(
            f"manifest schema_version {version!r} is not supported by this runtime "
            f"(reads {', '.join(map(str, READABLE_VERSIONS))}); install a matching edgepack version"
        )
    if version == 1:
        data = upgrade_v1(data)
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise BundleError(
            f"manifest is invalid: {validation_problems(exc)}; rebuild the bundle with this "
            "edgepack, or run it with the edgepack version that built it"
        ) from None


def validation_problems(exc: ValidationError) -> str:
    """Each problem on one line's worth: where (dotted) and what, e.g.
    "backend.onnx.gpu_layers: Extra inputs are not permitted"."""
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "manifest"
        context = error.get("ctx") or {}
        if error["type"] == "union_tag_invalid":
            discriminator = str(context.get("discriminator", "")).strip("'")
            problems.append(
                f"{where}.{discriminator}: {context.get('tag')!r} is not one of "
                f"{context.get('expected_tags')}"
            )
        elif error["type"] == "union_tag_not_found":
            discriminator = str(context.get("discriminator", "")).strip("'")
            problems.append(f"{where}.{discriminator}: missing")
        else:
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}")
    return "; ".join(problems)


# v1 kept every engine's settings in one flat backend object; each v2 spec takes its own.
_V1_BACKEND_FIELDS = {
    "onnx": ("providers", "intra_op_threads", "enable_cpu_mem_arena", "allow_spinning"),
    "tflite": ("intra_op_threads", "xnnpack"),
    "llamacpp": ("intra_op_threads", "gpu_layers"),
}
_V1_ALLOW_SPINNING = True  # v1's default when a manifest left it out


def upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A v1 manifest's JSON as the v2 model reads it: the same facts, discriminated.

    The signature covers the bytes as written, so verification is untouched; only the
    in-memory model is upgraded. ``schema_version`` stays 1, so readers can tell.
    """
    data = dict(data)
    backend = data.get("backend")
    if isinstance(backend, dict) and backend.get("name") in _V1_BACKEND_FIELDS:
        name = backend["name"]
        upgraded = {key: backend[key] for key in _V1_BACKEND_FIELDS[name] if key in backend}
        if name == "onnx":
            upgraded.setdefault("allow_spinning", _V1_ALLOW_SPINNING)
        data["backend"] = {"name": name, **upgraded}
    measurements = data.get("measurements")
    if isinstance(measurements, dict) and "kind" not in measurements:
        kind = "llm" if "tg_tokens_per_s" in measurements else "tensor"
        data["measurements"] = {"kind": kind, **measurements}
    selftest = data.get("selftest")
    if isinstance(selftest, dict) and "kind" not in selftest:
        kind = "greedy-tokens" if "tokens" in selftest else "tensors"
        data["selftest"] = {"kind": kind, **selftest}
    return data
