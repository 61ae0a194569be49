"""ONNX models: optimized and quantized with ONNX Runtime's tools, run by ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from edge_runtime.cpus import usable_cpus
from edge_runtime.manifest import OnnxBackendSpec

from .base import DeviceRuntime, ProfileSection, Recipe, Step, check_names, recipes_by_name
from .tensors import tensor_bench, tensor_format

if TYPE_CHECKING:  # the engine loads when a session is made, not with the profiles
    from edge_runtime.backends.onnx import OnnxSession


def _judged_before_mixed(settings, profile) -> bool:
    """Whether the chain runs int8-static-qdq-per-channel (the same whole-graph
    quantization) before int8-static-mixed, so the mixed search need not judge it again."""
    if settings.recipe is not None:  # one recipe forced: nothing ran before it
        return False
    chain = list(profile.onnx.recipes)
    if "int8-static-mixed" not in chain:
        return False
    return "int8-static-qdq-per-channel" in chain[: chain.index("int8-static-mixed")]


RECIPES = recipes_by_name(
    Recipe(
        "int8-static-qdq-per-channel",
        "int8 weights and activations, QDQ, per-channel weight scales, calibrated ranges",
        (Step("OnnxStaticQuantize", {"per_channel": True}),),
        needs_calibration=True,
    ),
    Recipe(
        "int8-static-percentile",
        "int8 QDQ as int8-static-qdq-per-channel, activation ranges clipped at the 99.999th "
        "percentile, so a few outliers no longer waste the int8 levels",
        (Step("OnnxStaticQuantize", {"per_channel": True, "calibrate_method": "percentile"}),),
        needs_calibration=True,
    ),
    Recipe(
        "int8-static-entropy",
        "int8 QDQ as int8-static-qdq-per-channel, activation ranges that minimise the KL "
        "divergence of each histogram (slower to calibrate)",
        (Step("OnnxStaticQuantize", {"per_channel": True, "calibrate_method": "entropy"}),),
        needs_calibration=True,
    ),
    Recipe(
        "int8-static-mixed",
        "int8 QDQ with the nodes that break the gate kept in float, found automatically",
        (
            Step(
                "OnnxMixedPrecisionQuantize",
                {"per_channel": True},
                options=lambda settings, profile: {
                    "whole_graph_first": not _judged_before_mixed(settings, profile)
                },
            ),
        ),
        needs_calibration=True,
    ),
    Recipe(
        "int8-dynamic-per-channel",
        "int8 per-channel weights; activations quantized at run time",
        (Step("OnnxDynamicQuantize", {"per_channel": True}),),
    ),
    Recipe(
        "fp16",
        "float16 weights and compute, float32 inputs and outputs",
        (Step("OnnxToFloat16", {"keep_io_types": True}),),
    ),
    Recipe(
        "int8-weights",
        "int8 per-channel weights widened to float32 in the graph, float32 activations: "
        "about 4x smaller, for models whose activations do not survive int8",
        (Step("OnnxInt8Weights"),),
    ),
    Recipe(
        "fp16-weights",
        "float16 weights widened to float32 when the model loads: half the size, float32 "
        "compute and speed (for CPUs without float16 arithmetic)",
        (Step("OnnxFloat16Weights"),),
    ),
    Recipe("fp32", "the optimized float32 graph, unquantized"),
)


class OnnxTargetConfig(ProfileSection):
    providers: list[str] = Field(
        min_length=1, description="ONNX Runtime execution providers, most preferred first"
    )
    threads: int = Field(ge=0, description="intra-op threads; 0 lets ONNX Runtime decide")
    cpu_mem_arena: bool = Field(
        description="keep ONNX Runtime's CPU memory arena; off on edge devices to save RAM"
    )
    allow_spinning: bool = Field(
        False,
        description="let ONNX Runtime's idle worker threads spin-wait for the next run: a "
        "little lower latency back to back, but cores stay busy between requests, which "
        "costs power and heat on battery or passively cooled devices",
    )
    graph_optimization: Literal["disabled", "basic", "extended"] = Field(
        "basic",
        description="offline ONNX Runtime graph optimization level; 'basic' keeps standard "
        "ONNX ops so the model stays portable to every execution provider",
    )
    recipes: list[str] = Field(
        min_length=1, description="quantization recipes to try, most compressed first"
    )

    @field_validator("recipes")
    @classmethod
    def _known_recipes(cls, names: list[str]) -> list[str]:
        return check_names(names, RECIPES, "onnx recipe")


def backend_spec(profile) -> OnnxBackendSpec:
    return OnnxBackendSpec(
        providers=profile.onnx.providers,
        intra_op_threads=profile.onnx.threads,
        enable_cpu_mem_arena=profile.onnx.cpu_mem_arena,
        allow_spinning=profile.onnx.allow_spinning,
    )


def host_session(
    path: Path, threads: int | None = None, backend: OnnxBackendSpec | None = None
) -> OnnxSession:
    """The model on this host's CPU: every core unless ``threads`` is given, ONNX Runtime's
    session defaults unless ``backend`` (the profile's spec) sets the arena and spinning.
    The evaluate pass takes the defaults; the speed check passes the profile's settings."""
    from edge_runtime.backends.onnx import OnnxSession

    options = {}
    if backend is not None:
        options = {
            "cpu_mem_arena": backend.enable_cpu_mem_arena,
            "allow_spinning": backend.allow_spinning,
        }
    return OnnxSession(
        path, threads=threads or usable_cpus().count, providers=["CPUExecutionProvider"], **options
    )


class _ExactSession:
    """The model with exact integer sums, as on ARM or with VNNI, where ONNX Runtime's
    x86 AVX2 int8 kernels saturate 16-bit pair sums: graph fusions off (a QDQ model runs
    as dequantize, float op, quantize) and MatMulInteger/ConvInteger in float
    (``packager.onnx_exact``). For the self-test's alternate reference only."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        from ..onnx_exact import exact_integer_model

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(
            exact_integer_model(path).SerializeToString(),
            sess_options=options,
            providers=["CPUExecutionProvider"],
        )
        self.names = [output.name for output in self.session.get_outputs()]

    def run(self, inputs: dict) -> dict:
        return dict(zip(self.names, self.session.run(self.names, inputs), strict=True))


def signature(path: Path) -> tuple[list, list]:
    """Inputs and outputs, as OnnxValidate reads them (weights not loaded)."""
    from ..onnx_model import model_signature

    inputs, outputs, _ = model_signature(path)
    return inputs, outputs


def weight_counts(path: Path) -> dict[str, int]:
    """Initializers (and Constant tensors) of rank 2 or more, the weight matrices and
    kernels, by element type; biases, scales and zero points are left out. Int8 weights
    are what both quantizers leave: QDQ's DequantizeLinear inputs, MatMulInteger's and
    ConvInteger's weights. External data is not loaded; the types are in the header."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors.extend(attr.t for attr in node.attribute if attr.HasField("t"))
    counts: dict[str, int] = {}
    for tensor in tensors:
        if len(tensor.dims) >= 2:
            kind = onnx.TensorProto.DataType.Name(tensor.data_type).lower()
            kind = "float32" if kind == "float" else kind
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def measure_loader(request: dict):
    """In the measuring worker: load as the device will (the bundle's backend spec)."""
    from edge_runtime.backends.onnx import OnnxSession

    spec = OnnxBackendSpec.model_validate(request["backend"])
    session = OnnxSession(
        Path(request["model"]),
        threads=request["threads"],
        # The host has no GPU provider to speak of; CPU figures are what it can measure.
        providers=["CPUExecutionProvider"],
        cpu_mem_arena=spec.enable_cpu_mem_arena,
        allow_spinning=spec.allow_spinning,
    )
    return tensor_bench(session.run, request)


PIPELINE = tensor_format(
    name="onnx",
    rank=0,  # profiles list onnx, gguf, tflite
    noun="an ONNX",
    suffixes=(".onnx",),
    engine="onnx",
    device=DeviceRuntime(extra="onnx", engine_package="onnxruntime"),
    profile_section=OnnxTargetConfig,
    recipes=RECIPES,
    prepare=(
        Step("OnnxValidate", announce=lambda p: "validate: onnx checker, opset, external data"),
        # Below opset 13 only: converted, checked against the original on the eval data.
        Step("OnnxOpsetUpgrade", only_if_changed=True),
        Step(
            "OnnxGraphOptimize",
            options=lambda settings, profile: {"level": profile.onnx.graph_optimization},
            announce=lambda profile: (
                f"optimize: ONNX Runtime graph optimization ({profile.onnx.graph_optimization})"
            ),
        ),
    ),
    backend_spec=backend_spec,
    tool_distributions=("edgepack", "onnx", "onnxruntime", "onnxconverter-common", "numpy"),
    host_session=host_session,
    kernel_check=_ExactSession,
    signature=signature,
    weight_counts=weight_counts,
    worker_loader="packager.formats.onnx:measure_loader",
)
