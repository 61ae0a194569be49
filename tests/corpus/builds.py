"""Build a corpus model for a profile and judge the bundle the way a user would.

``build_and_judge`` runs ``packager.build.build_bundle`` with the model's options, opens
the bundle with ``edge_runtime.Runtime``, runs the model's task check against the float
source, and counts the weights in the bundle's model file by type, independently of the
packager's own count. Shared by the corpus tests and ``scripts/bench_gate.py``.
"""

from __future__ import annotations

import collections
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .models import MODELS, Prepared, TaskResult, reference_runner
from .runners import BundleRunner

INT8_TYPES = {"int8", "uint8", "int4", "uint4"}
FP16_TYPES = {"float16", "bfloat16"}


def weight_types(model_file: Path) -> collections.Counter:
    """Weight tensors (constants) of an ONNX or TFLite file, counted by element type."""
    counts: collections.Counter = collections.Counter()
    if model_file.suffix == ".tflite":
        import numpy as np
        from ai_edge_litert.tools import flatbuffer_utils

        names = {v: k.lower() for k, v in vars(_tflite_types()).items() if not k.startswith("_")}
        model = flatbuffer_utils.read_model(str(model_file))
        for subgraph in model.subgraphs:
            for tensor in subgraph.tensors:
                buffer = model.buffers[tensor.buffer]
                if buffer.data is not None and np.size(buffer.data):
                    counts[names.get(tensor.type, str(tensor.type))] += 1
        return counts
    import onnx
    from onnx import helper

    model = onnx.load(str(model_file), load_external_data=False)
    for graph in _graphs(model.graph):
        for tensor in graph.initializer:
            counts[helper.tensor_dtype_to_np_dtype(tensor.data_type).name] += 1
        for node in graph.node:
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.name == "value":
                        dtype = helper.tensor_dtype_to_np_dtype(attribute.t.data_type)
                        counts[dtype.name] += 1
    return counts


def _tflite_types():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated.TensorType


def _graphs(graph):
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.g.node:
                yield from _graphs(attribute.g)
            for sub in attribute.graphs:
                yield from _graphs(sub)


def file_precision(counts: collections.Counter) -> str:
    """What the file holds: int8 if any weight is int8, else fp16 if any is, else fp32."""
    if any(counts[t] for t in INT8_TYPES):
        return "int8"
    if any(counts[t] for t in FP16_TYPES):
        return "fp16"
    return "fp32"


def float32_size(model_file: Path) -> int:
    """The model's size with every fp16 weight stored as fp32: what fp32 means for an
    fp16 source (the ratio's denominator); an fp32 file's own size."""
    if model_file.suffix != ".tflite":
        return model_file.stat().st_size
    import numpy as np
    from ai_edge_litert.tools import flatbuffer_utils

    half = _tflite_types().FLOAT16
    model = flatbuffer_utils.read_model(str(model_file))
    extra = sum(
        np.size(model.buffers[t.buffer].data)
        for subgraph in model.subgraphs
        for t in subgraph.tensors
        if t.type == half and model.buffers[t.buffer].data is not None
    )  # bytes of fp16 data: the same again once stored as fp32
    return model_file.stat().st_size + int(extra)


@dataclass
class Judged:
    """One corpus build and what a user of the bundle would see."""

    name: str
    profile: str
    seconds: float
    chosen: str
    precision_claimed: str
    precision_in_file: str
    weight_counts: dict[str, int]
    size_ratio: float  # fp32 model bytes / bundle model bytes
    speed_ratio: float | None  # Attempt.speed of the chosen recipe: reference / candidate
    speed_representative: bool | None
    excluded_nodes: list[str]
    task: TaskResult
    attempts: list[dict] = field(default_factory=list)  # recipe, status, reason

    @property
    def compressed(self) -> bool:
        """A bundle at least 1.8x smaller than fp32 that passes the task check."""
        return self.size_ratio >= 1.8 and self.task.passed

    def why_not_compressed(self) -> str:
        if self.compressed:
            return ""
        if not self.task.passed:
            return f"{self.chosen} fails the task check: {self.task.describe()}"
        refused = [
            f"{a['recipe']}: {a['status']}" + (f" ({a['reason']})" if a["reason"] else "")
            for a in self.attempts
            if a["status"] != "passed"
        ]
        return f"chose {self.chosen} (size ratio {self.size_ratio:.2f}); " + "; ".join(refused)


def build_and_judge(
    prepared: Prepared,
    profile: str,
    key: Path,
    pubkey: Path,
    out_dir: Path,
    measure: bool = False,
    **options,
) -> Judged:
    """Build ``prepared`` for ``profile`` with its corpus options (plus ``options``), then
    open the bundle and run the task check against the float model."""
    from edge_runtime import Runtime
    from packager.build import BuildConfig, build_bundle
    from packager.profiles import load_profile

    model = MODELS[prepared.name]
    output = out_dir / f"{prepared.name}-{profile}.edgepkg"
    config = BuildConfig(
        model=prepared.model,
        profile=load_profile(profile),
        key=key,
        output=output,
        calibration=prepared.calibration,
        eval=prepared.eval,
        measure=measure,
        **{**model.options, **options},
    )
    started = time.perf_counter()
    result = build_bundle(config)
    seconds = time.perf_counter() - started
    manifest = result.manifest
    record = manifest.quantization
    chosen = next(a for a in record.attempts if a.recipe == record.chosen)
    member = manifest.model.path
    model_file = out_dir / f"{prepared.name}-{profile}-model{Path(member).suffix}"
    with tarfile.open(output) as bundle:  # a plain tar; the runtime has verified it below
        source = bundle.extractfile(member)
        model_file.write_bytes(source.read())
    counts = weight_types(model_file)
    with Runtime.open(output, pubkey) as runtime:
        reference = reference_runner(model, prepared)
        candidate = BundleRunner(runtime, reference, model.batch_axes)
        task = model.check(reference, candidate, prepared)
    return Judged(
        name=prepared.name,
        profile=profile,
        seconds=seconds,
        chosen=record.chosen,
        precision_claimed=manifest.model.precision,
        precision_in_file=file_precision(counts),
        weight_counts=dict(counts),
        size_ratio=float32_size(prepared.model) / model_file.stat().st_size,
        speed_ratio=chosen.speed.ratio if chosen.speed else None,
        speed_representative=chosen.speed.representative if chosen.speed else None,
        excluded_nodes=list(chosen.excluded_nodes),
        task=task,
        attempts=[
            {"recipe": a.recipe, "status": a.status, "reason": a.reason} for a in record.attempts
        ],
    )
