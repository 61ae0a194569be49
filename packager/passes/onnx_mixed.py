"""OnnxMixedPrecisionQuantize: static int8 QDQ, with the nodes that break the gate kept in float.

Whole-graph int8 fails on real models in a few known ways: a tensor whose range is set by
a huge constant (an attention mask filled with -1e9 or the float minimum) squeezes every
meaningful value into one int8 level; a final Concat of quantities with different ranges
(box coordinates 0-320 next to class scores 0-1) gets one scale for both; and a few
tensors with outliers quantize badly. Intel Neural Compressor and Olive get int8 on such
models by keeping those nodes in float. This pass does the same, judged by the build's
own gate (``PassContext.judge``):

1. the whole graph in int8; if the gate passes it, that is the model (skipped when the
   chain has just judged that same quantization: ``whole_graph_first``);
2. heuristics from the float model's activation ranges on the calibration data: the nodes
   fed by huge constants, the tensors downstream of them whose range stays huge, and
   final Concat heads whose inputs' ranges differ by ``range_ratio`` or more;
3. a sensitivity search: the float and QDQ models run side by side on calibration samples
   with every intermediate tensor as an output (``packager.onnx_activations``, after
   ONNX Runtime's ``qdq_loss_debug``), each tensor's signal-to-quantization-noise ratio
   against float is measured (per channel too), and the tensors where the noise rises
   most (the noise the producing node adds) are kept in float, with the tensors an
   outlier range rides on to, in growing batches, until the gate passes or a limit is
   reached.

Keeping a tensor in float means excluding its producer and all its consumers from
quantization (``nodes_to_exclude``): excluding only the producer would still put a QDQ
pair on the tensor at each quantized consumer's input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from ..errors import DataError
from ..onnx_activations import SQNR_CAP_DB, measure_activations
from .base import ModelArtifact, Pass, PassContext, PassOutput
from .onnx_quantize import (
    QDQ_PROVIDERS,
    OnnxStaticQuantizeConfig,
    quantize_qdq,
    shared_calibration_cache,
)

# Ops that only move or reshape data: a head's Concat reaches the graph output through
# these, and excluding the Concat must exclude them too (each would requantize the tensor).
DATA_MOVEMENT_OPS = frozenset(
    {
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Flatten",
        "Identity",
        "Slice",
        "Gather",
        "Split",
        "Expand",
        "Tile",
    }
)


class OnnxMixedPrecisionQuantizeConfig(OnnxStaticQuantizeConfig):
    max_excluded_nodes: int = Field(
        128, ge=1, description="nodes kept in float at most (heuristics and search together)"
    )
    max_excluded_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="share of the graph's nodes kept in float at most: a model mostly in "
        "float gains little from int8",
    )
    search_steps: int = Field(
        6, ge=0, description="sensitivity-search rounds (quantize and judge) at most"
    )
    first_batch: int = Field(
        2, ge=1, description="tensors kept in float in the first search round; doubled each round"
    )
    range_ratio: float = Field(
        20.0,
        gt=1,
        description="a final Concat whose inputs' ranges differ by this factor is kept in float",
    )
    huge_constant: float = Field(
        1e4,
        gt=0,
        description="a constant with a value this large (or infinite) marks an attention-mask "
        "style addition; its node and the tensors downstream with ranges this large stay float",
    )
    whole_graph_first: bool = Field(
        True,
        description="judge the whole graph in int8 first; off when the chain has just "
        "judged that same quantization (int8-static-qdq-per-channel)",
    )
    outlier_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="the search keeps a tensor in float together with the tensors after it "
        "whose range is at least this share of its own (an outlier riding the residual stream)",
    )
    debug_samples: int = Field(
        8, gt=0, description="calibration samples the activation ranges and errors are measured on"
    )


@dataclass
class Graph:
    """The float model's nodes by name, with who produces and who reads each tensor."""

    names: list[str]
    op_types: dict[str, str]
    inputs: dict[str, list[str]]  # node -> its activation inputs (constants left out)
    outputs: dict[str, list[str]]  # node -> its outputs
    all_inputs: dict[str, list[str]]  # node -> every input, constants included
    producer: dict[str, str] = field(default_factory=dict)  # tensor -> node
    consumers: dict[str, list[str]] = field(default_factory=dict)  # tensor -> nodes
    constants: dict[str, Any] = field(default_factory=dict)  # tensor -> array
    graph_outputs: frozenset[str] = frozenset()

    @classmethod
    def of(cls, model) -> Graph:
        from onnx import numpy_helper

        constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.name == "value":
                        constants[node.output[0]] = numpy_helper.to_array(attribute.t)
        graph = cls([], {}, {}, {}, {}, constants=constants)
        graph.graph_outputs = frozenset(output.name for output in model.graph.output)
        for node in model.graph.node:
            if node.op_type == "Constant":
                continue
            graph.names.append(node.name)
            graph.op_types[node.name] = node.op_type
            graph.all_inputs[node.name] = [t for t in node.input if t]
            graph.inputs[node.name] = [t for t in node.input if t and t not in constants]
            graph.outputs[node.name] = [t for t in node.output if t]
            for tensor in graph.outputs[node.name]:
                graph.producer[tensor] = node.name
            for tensor in set(graph.inputs[node.name]):
                graph.consumers.setdefault(tensor, []).append(node.name)
        return graph

    def keep_float(self, tensor: str) -> set[str]:
        """The nodes to exclude so that ``tensor`` is never quantized."""
        nodes = set(self.consumers.get(tensor, []))
        if tensor in self.producer:
            nodes.add(self.producer[tensor])
        return nodes

    def huge_constant_inputs(self, node: str, limit: float) -> bool:
        import numpy as np

        for tensor in self.all_inputs.get(node, []):
            value = self.constants.get(tensor)
            if value is None or value.size == 0 or value.dtype.kind != "f":
                continue
            if not np.all(np.isfinite(value)) or float(np.abs(value).max()) >= limit:
                return True
        return False


def load_graph(path: Path) -> Graph:
    import onnx

    return Graph.of(onnx.load(str(path)))


def name_nodes(source: Path, out_dir: Path) -> Path:
    """``source``, or a copy whose nodes all have unique names (exclusion is by name)."""
    import onnx

    model = onnx.load(str(source))
    seen: set[str] = set()
    changed = False
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}_edgepack"
            changed = True
        seen.add(node.name)
    if not changed:
        return source
    named = out_dir / "named.onnx"
    onnx.save(model, str(named))
    return named


def huge_constant_tensors(graph: Graph, ranges: dict[str, tuple[float, float]], limit: float):
    """The tensors that carry a huge constant: outputs of nodes fed one (an attention mask
    scaled by -1e9), then downstream tensors whose range stays that large (the scores with
    the mask added)."""
    found: list[str] = []
    frontier = [
        tensor
        for node in graph.names
        if graph.huge_constant_inputs(node, limit)
        for tensor in graph.outputs[node]
    ]
    while frontier:
        tensor = frontier.pop(0)
        if tensor in found:
            continue
        found.append(tensor)
        for consumer in graph.consumers.get(tensor, []):
            for output in graph.outputs[consumer]:
                low, high = ranges.get(output, (0.0, 0.0))
                if max(abs(low), abs(high)) >= limit:
                    frontier.append(output)
    return found


def head_concat_tensors(graph: Graph, ranges: dict[str, tuple[float, float]], ratio: float):
    """Outputs of final Concats (reaching a graph output through data-movement ops only)
    whose inputs' ranges differ by ``ratio`` or more, and the tensors on their way out."""
    found: list[str] = []
    for node in graph.names:
        if graph.op_types[node] != "Concat":
            continue
        widths = [ranges[t][1] - ranges[t][0] for t in graph.inputs[node] if t in ranges]
        widths = [w for w in widths if w > 0 and math.isfinite(w)]
        if len(widths) < 2 or max(widths) / min(widths) < ratio:
            continue
        path = _path_to_output(graph, graph.outputs[node][0])
        if path is not None:
            found.extend(path)
    return found


def _path_to_output(graph: Graph, tensor: str) -> list[str] | None:
    """``tensor`` and the tensors after it, if every reader on the way to a graph output
    only moves data; None when it feeds computation."""
    path = [tensor]
    index = 0
    while index < len(path):
        current = path[index]
        index += 1
        for consumer in graph.consumers.get(current, []):
            if graph.op_types[consumer] not in DATA_MOVEMENT_OPS:
                return None
            path.extend(graph.outputs[consumer])
    reaches = any(t in graph.graph_outputs for t in path)
    return path if reaches else None


def rank_tensors(graph: Graph, sqnr: dict[str, float]) -> list[tuple[str, float]]:
    """Tensors by the quantization noise their producer adds, worst first: the rise in
    noise-to-signal power ratio from the producer's noisiest input to this tensor (a
    graph input's own ratio). Linear, not dB: from 120 to 40 dB is a large drop in dB
    that no one needs to fix; from 20 to 0 dB is one that breaks the model."""

    def nsr(tensor: str) -> float:
        return 10 ** (-sqnr.get(tensor, SQNR_CAP_DB) / 10)

    added = []
    for tensor in sqnr:
        node = graph.producer.get(tensor)
        if node is None and tensor not in graph.consumers:
            continue
        before = max((nsr(t) for t in graph.inputs[node]), default=0.0) if node else 0.0
        added.append((tensor, nsr(tensor) - before))
    added.sort(key=lambda pair: (-pair[1], pair[0]))
    return [(tensor, value) for tensor, value in added if value > 0]


@dataclass
class Exclusion:
    """The nodes kept in float so far, within the pass's limit."""

    limit: int
    nodes: set[str] = field(default_factory=set)
    tensors: list[str] = field(default_factory=list)

    def add(self, graph: Graph, tensor: str, follow: list[str] | None = None) -> bool:
        """Keep ``tensor`` (and the tensors ``follow`` names with it) in float; False
        (nothing changed) when that would pass the limit or changes nothing."""
        if tensor in self.tensors:
            return False
        group = [tensor, *(follow or [])]
        more = set().union(*(graph.keep_float(t) for t in group)) - self.nodes
        if not more or len(self.nodes) + len(more) > self.limit:
            return False
        self.nodes |= more
        self.tensors.extend(t for t in group if t not in self.tensors)
        return True


def outlier_path(
    graph: Graph, tensor: str, ranges: dict[str, tuple[float, float]], share: float
) -> list[str]:
    """The tensors after ``tensor`` whose range stays at least ``share`` of its own: a
    wide range (an outlier channel) rides on through bias and residual additions until a
    normalisation ends it, and keeping only the first tensor in float would quantize it
    again at the next one."""
    top = _magnitude(ranges.get(tensor))
    if not top or not math.isfinite(top):
        return []
    found: list[str] = []
    frontier = [tensor]
    while frontier:
        current = frontier.pop()
        for consumer in graph.consumers.get(current, []):
            for output in graph.outputs[consumer]:
                if output not in found and _magnitude(ranges.get(output)) >= share * top:
                    found.append(output)
                    frontier.append(output)
    return found


def _magnitude(bounds: tuple[float, float] | None) -> float:
    return max(abs(bounds[0]), abs(bounds[1])) if bounds else 0.0


class OnnxMixedPrecisionQuantize(Pass):
    """Static int8 QDQ with the nodes that break the gate found and kept in float."""

    name = "OnnxMixedPrecisionQuantize"
    Config = OnnxMixedPrecisionQuantizeConfig
    supported_providers = QDQ_PROVIDERS  # the same QDQ form as static int8
    needs_calibration = True

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        if ctx.calibration is None:
            raise DataError("mixed-precision quantization needs --calibration FILE.npz")
        config = self.config
        judge = ctx.judge or _default_judge(ctx)
        source = name_nodes(model.path, out_dir)
        graph = load_graph(source)
        limit = max(
            1, min(config.max_excluded_nodes, int(len(graph.names) * config.max_excluded_fraction))
        )
        search = _Search(self, ctx, source, out_dir, judge, model.path)

        if config.whole_graph_first:
            verdict = search.try_nodes(set(), "whole graph in int8")
            if verdict.passed:
                return search.result()
        else:
            ctx.progress("mixed precision: the whole graph in int8 was judged by the recipe before")

        # Fed as the build feeds the model (batch axes, constants, carried state).
        samples = ctx.calibration_feeds(config.debug_samples)
        work = out_dir / "debug"
        work.mkdir()
        ranges = measure_activations(source, None, samples, work).ranges
        exclusion = Exclusion(limit)
        huge = huge_constant_tensors(graph, ranges, config.huge_constant)
        heads = head_concat_tensors(graph, ranges, config.range_ratio)
        for tensor in huge + heads:
            exclusion.add(graph, tensor)
        if exclusion.nodes:
            what = []
            if huge:
                what.append(f"{len(huge)} tensors carrying huge constants")
            if heads:
                what.append(f"{len(heads)} head Concat tensors with mixed ranges")
            verdict = search.try_nodes(set(exclusion.nodes), " and ".join(what) + " in float")
            if verdict.passed:
                return search.result()

        batch = config.first_batch
        for step in range(1, config.search_steps + 1):
            errors = measure_activations(
                source, search.quantize(exclusion.nodes), samples, work
            ).sqnr
            added = 0
            for tensor, _drop in rank_tensors(graph, errors):
                if added >= batch:
                    break
                follow = outlier_path(graph, tensor, ranges, config.outlier_share)
                added += exclusion.add(graph, tensor, follow)
            if not added:
                ctx.progress(
                    f"mixed precision: search stopped at {len(exclusion.nodes)} float nodes "
                    f"(limit {limit}, or no tensor left that adds noise)"
                )
                break
            verdict = search.try_nodes(
                set(exclusion.nodes), f"sensitivity step {step}: {added} more tensors in float"
            )
            if verdict.passed:
                break
            batch *= 2
        if not search.verdicts:  # nothing to keep in float was found: the whole graph
            search.try_nodes(set(), "whole graph in int8")
        return search.result()


@dataclass
class _Verdict:
    path: Path
    nodes: frozenset[str]
    passed: bool
    degradation: float


class _Search:
    """The candidates tried so far; the result is the first that passed, else the one
    with the lowest degradation."""

    def __init__(
        self,
        owner: OnnxMixedPrecisionQuantize,
        ctx,
        source: Path,
        out_dir: Path,
        judge,
        source_of_ranges: Path,
    ):
        self.owner, self.ctx, self.source, self.out_dir, self.judge = (
            owner,
            ctx,
            source,
            out_dir,
            judge,
        )
        self.verdicts: list[_Verdict] = []
        self.files: dict[frozenset[str], Path] = {}
        # The ranges int8-static-qdq-per-channel computed for this model, if it ran.
        self.calibration_cache = shared_calibration_cache(ctx, source_of_ranges, owner.config)

    def quantize(self, nodes: set[str]) -> Path:
        """A QDQ candidate with ``nodes`` in float (the calibration ranges computed once)."""
        key = frozenset(nodes)
        if key not in self.files:
            path = self.out_dir / f"candidate-{len(self.files)}.onnx"
            quantize_qdq(
                self.source,
                path,
                self.owner.config,
                self.ctx,
                sorted(nodes),
                calibration_cache=self.calibration_cache,
            )
            self.files[key] = path
        return self.files[key]

    def try_nodes(self, nodes: set[str], what: str) -> _Verdict:
        path = self.quantize(nodes)
        figures = self.judge(ModelArtifact(path, "onnx", "int8"))
        verdict = _Verdict(
            path, frozenset(nodes), bool(figures["passed"]), float(figures["degradation"])
        )
        self.verdicts.append(verdict)
        self.ctx.progress(
            f"mixed precision: {what} ({len(nodes)} nodes in float): degradation "
            f"{verdict.degradation:.4g}, {'passed' if verdict.passed else 'failed'}"
        )
        return verdict

    def result(self) -> PassOutput:
        passed = [v for v in self.verdicts if v.passed]
        best = passed[0] if passed else min(self.verdicts, key=lambda v: v.degradation)
        return PassOutput(
            ModelArtifact(best.path, "onnx", "int8"),
            {
                "excluded_nodes": sorted(best.nodes),
                "candidates_tried": len(self.verdicts),
                "whole_graph_degradation": next(
                    (v.degradation for v in self.verdicts if not v.nodes), None
                ),
            },
        )


def _default_judge(ctx: PassContext):
    """Outside a build (the pass run on its own): the Evaluate pass with its defaults."""
    from .evaluate import Evaluate

    gate = Evaluate()
    return lambda artifact: gate.run(artifact, ctx)[0].metrics
