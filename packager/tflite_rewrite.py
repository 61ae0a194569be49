"""Lossless rewrites of a TFLite flatbuffer that make older models quantizable.

Models from older converters (MediaPipe's, for one) differ from what ai-edge-quantizer
expects in three ways, none of which changes what the model computes:

- **No signature.** The quantizer calibrates through a signature (``serving_default``),
  and the packager names inputs and outputs through it. ``add_signature`` builds one from
  the first subgraph's inputs and outputs, keyed by their tensor names: the names the
  interpreter already reports for a signature-less model, so the manifest's names do not
  change.
- **Operator codes in the deprecated field.** Before schema 3a the builtin operator code
  lived in ``deprecated_builtin_code`` only; ``builtin_code`` is then absent and reads as
  0 (ADD). ai-edge-quantizer reads ``builtin_code`` alone, so it sees every operator as an
  ADD, which the dynamic int8 recipe does not quantize: it quietly quantizes nothing.
  ``fill_builtin_codes`` writes the real code into ``builtin_code``, as LiteRT's own
  ``GetBuiltinCode`` reads it.
- **float16 weights behind DEQUANTIZE.** The converter's fp16 option stores each weight as
  a float16 constant feeding a DEQUANTIZE operator. ``fold_fp16_dequantize`` replaces each
  such pair by the float32 constant the interpreter would compute at load time, so the
  int8 recipes start from the float32 model.

The object API (``ModelT``) and its reader and writer ship with ai-edge-litert, which the
packager installs; numpy and that package are imported inside the functions, because the
CLI imports the passes at startup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIGNATURE_KEY = "serving_default"
_DEQUANTIZE = 6  # BuiltinOperator.DEQUANTIZE
_FLOAT32, _FLOAT16 = 0, 1  # TensorType


@dataclass
class Rewrite:
    """What a rewrite changed, in words the build log and the pass figures can use."""

    signature: dict[str, list[str]] | None = None  # {"inputs": [...], "outputs": [...]}
    builtin_codes: int = 0  # operator codes moved out of the deprecated field
    folded: list[str] = field(default_factory=list)  # float16 constants made float32
    fused: int = 0  # RELU operators folded into the operator before them

    @property
    def changed(self) -> bool:
        return bool(self.signature or self.builtin_codes or self.folded or self.fused)


def read_model(path: Path) -> Any:
    """The model as a mutable ``ModelT`` (buffers as numpy arrays, indices as lists)."""
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils.read_model_from_bytearray(bytearray(Path(path).read_bytes()))


def write_model(model: Any, path: Path) -> None:
    from ai_edge_litert.tools import flatbuffer_utils

    flatbuffer_utils.write_model(model, str(path))


def builtin_code(operator_code: Any) -> int:
    """The operator's builtin code, wherever the converter wrote it."""
    return max(operator_code.builtinCode, operator_code.deprecatedBuiltinCode)


def fill_builtin_codes(model: Any) -> int:
    """Copy each deprecated-only builtin code into ``builtin_code``; how many changed.

    Codes above 127 exist only in ``builtin_code`` (the deprecated field is a byte, and
    holds 127, PLACEHOLDER_FOR_GREATER_OP_CODES); those are already right.
    """
    changed = 0
    for operator_code in model.operatorCodes or []:
        code = builtin_code(operator_code)
        if operator_code.builtinCode != code:
            operator_code.builtinCode = code
            changed += 1
    return changed


def _name(tensor: Any) -> str:
    name = tensor.name
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else (name or "")


def signature_names(model: Any) -> dict[str, list[str]]:
    """The names a signature would give the first subgraph's inputs and outputs: their
    tensor names, made unique (``input_0``/``output_0`` stand in for an empty name)."""
    subgraph = model.subgraphs[0]
    taken: set[str] = set()
    names: dict[str, list[str]] = {"inputs": [], "outputs": []}
    for kind, indices in (("inputs", subgraph.inputs), ("outputs", subgraph.outputs)):
        for position, index in enumerate(indices or []):
            base = _name(subgraph.tensors[index]) or f"{kind[:-1]}_{position}"
            name, suffix = base, 1
            while name in taken:
                name, suffix = f"{base}_{suffix}", suffix + 1
            taken.add(name)
            names[kind].append(name)
    return names


def add_signature(model: Any) -> dict[str, list[str]] | None:
    """Give a model without signatures a ``serving_default`` one over its first subgraph.

    Returns the input and output names it used, or None when the model has a signature.
    """
    if model.signatureDefs:
        return None
    from ai_edge_litert import schema_py_generated as schema

    subgraph = model.subgraphs[0]
    names = signature_names(model)
    signature = schema.SignatureDefT()
    signature.signatureKey = SIGNATURE_KEY
    signature.subgraphIndex = 0
    signature.inputs, signature.outputs = [], []
    for kind, indices, maps in (
        ("inputs", subgraph.inputs, signature.inputs),
        ("outputs", subgraph.outputs, signature.outputs),
    ):
        for name, index in zip(names[kind], indices or [], strict=True):
            tensor_map = schema.TensorMapT()
            tensor_map.name, tensor_map.tensorIndex = name, int(index)
            maps.append(tensor_map)
    model.signatureDefs = [signature]
    return names


def fp16_dequantize_pairs(model: Any) -> list[tuple[int, int]]:
    """(subgraph, operator) of each DEQUANTIZE that turns a dense float16 constant into
    float32. Sparse weights (DENSIFY, then DEQUANTIZE) stay as they are."""
    pairs = []
    for number, subgraph in enumerate(model.subgraphs):
        for position, operator in enumerate(subgraph.operators or []):
            if builtin_code(model.operatorCodes[operator.opcodeIndex]) != _DEQUANTIZE:
                continue
            source = subgraph.tensors[operator.inputs[0]]
            target = subgraph.tensors[operator.outputs[0]]
            data = model.buffers[source.buffer].data
            if (
                source.type == _FLOAT16
                and target.type == _FLOAT32
                and source.sparsity is None  # stored compressed: DENSIFY reads it, not us
                and data is not None
                and len(data)
                and model.buffers[target.buffer].data is None
            ):
                pairs.append((number, position))
    return pairs


def fold_fp16_dequantize(model: Any) -> list[str]:
    """Replace each DEQUANTIZE(float16 constant) by the float32 constant it computes.

    The float16 tensors left without a reader are removed and their buffers emptied, so
    the file holds each weight once, in float32. Returns the folded tensors' names.
    """
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema

    pairs = fp16_dequantize_pairs(model)
    folded = []
    by_subgraph: dict[int, set[int]] = {}
    for number, position in pairs:
        subgraph = model.subgraphs[number]
        operator = subgraph.operators[position]
        source = subgraph.tensors[operator.inputs[0]]
        target = subgraph.tensors[operator.outputs[0]]
        raw = np.asarray(model.buffers[source.buffer].data, dtype=np.uint8).tobytes()
        weights = np.frombuffer(raw, dtype="<f2").astype("<f4")
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(weights.tobytes(), dtype=np.uint8)
        model.buffers.append(buffer)
        target.buffer = len(model.buffers) - 1
        folded.append(_name(target))
        by_subgraph.setdefault(number, set()).add(position)
    for number, positions in by_subgraph.items():
        subgraph = model.subgraphs[number]
        subgraph.operators = [
            op for index, op in enumerate(subgraph.operators) if index not in positions
        ]
        _drop_unused_tensors(model, number)
    _empty_unused_buffers(model)
    return folded


def _drop_unused_tensors(model: Any, number: int) -> None:
    """Remove the tensors of subgraph ``number`` that nothing refers to, renumbering the
    operators, the subgraph's inputs and outputs and the signatures over it."""
    subgraph = model.subgraphs[number]
    signatures = [s for s in model.signatureDefs or [] if s.subgraphIndex == number]
    used = set(subgraph.inputs or []) | set(subgraph.outputs or [])
    for operator in subgraph.operators:
        for indices in (operator.inputs, operator.outputs, operator.intermediates):
            used.update(indices if indices is not None else [])
    for signature in signatures:
        used.update(m.tensorIndex for m in (signature.inputs or []) + (signature.outputs or []))
    used.discard(-1)  # an absent optional input
    kept = [index for index in range(len(subgraph.tensors)) if index in used]
    if len(kept) == len(subgraph.tensors):
        return
    new_index = {old: new for new, old in enumerate(kept)}
    new_index[-1] = -1

    def renumber(indices):
        return None if indices is None else [new_index[int(i)] for i in indices]

    subgraph.tensors = [subgraph.tensors[index] for index in kept]
    subgraph.inputs, subgraph.outputs = renumber(subgraph.inputs), renumber(subgraph.outputs)
    for operator in subgraph.operators:
        operator.inputs = renumber(operator.inputs)
        operator.outputs = renumber(operator.outputs)
        operator.intermediates = renumber(operator.intermediates)
    for signature in signatures:
        for tensor_map in (signature.inputs or []) + (signature.outputs or []):
            tensor_map.tensorIndex = new_index[tensor_map.tensorIndex]


def _empty_unused_buffers(model: Any) -> None:
    """Drop the data of buffers no tensor or metadata entry names any more. The buffers
    themselves stay, so no index changes; an empty buffer costs a few bytes."""
    used = {tensor.buffer for subgraph in model.subgraphs for tensor in subgraph.tensors}
    used.update(entry.buffer for entry in model.metadata or [])
    for index, buffer in enumerate(model.buffers):
        if index not in used:
            buffer.data = None


def describe_weighted_operators(path: Path) -> str:
    """The operator types that take a constant float tensor, with counts, most first:
    e.g. "CONV_2D x25, PRELU x23", for a message about what a quantizer left alone."""
    from collections import Counter

    from ai_edge_litert import schema_py_generated as schema

    names = {code: name for name, code in vars(schema.BuiltinOperator).items() if name.isupper()}
    model = read_model(path)
    counts: Counter[str] = Counter()
    for subgraph in model.subgraphs:
        for operator in subgraph.operators or []:
            for index in operator.inputs or []:
                tensor = subgraph.tensors[index] if index >= 0 else None
                if tensor is None or tensor.type not in (_FLOAT32, _FLOAT16):
                    continue
                if model.buffers[tensor.buffer].data is not None:
                    code = builtin_code(model.operatorCodes[operator.opcodeIndex])
                    counts[names.get(code, f"operator {code}")] += 1
                    break
    return ", ".join(f"{name} x{count}" for name, count in counts.most_common()) or "none"


def normalize(source: Path, output: Path) -> Rewrite:
    """Fill builtin codes and add a signature where missing; write ``output`` only if
    anything changed. Returns what changed."""
    model = read_model(source)
    done = Rewrite(builtin_codes=fill_builtin_codes(model), signature=add_signature(model))
    if done.changed:
        write_model(model, output)
    return done


def dequantize_fp16(source: Path, output: Path) -> Rewrite:
    """Fold the float16 weights of ``source`` into float32; write ``output`` if any were."""
    model = read_model(source)
    done = Rewrite(folded=fold_fp16_dequantize(model))
    if done.changed:
        write_model(model, output)
    return done


_RELU = 19  # BuiltinOperator.RELU
_FUSABLE = {0: "ADD", 3: "CONV_2D", 4: "DEPTHWISE_CONV_2D"}  # ops with a fused activation
_ACTIVATION_NONE, _ACTIVATION_RELU = 0, 1


def fuse_relu(model: Any) -> int:
    """Fold each RELU into the ADD or convolution before it (its fused activation), where
    that op's output feeds nothing else. The same arithmetic in float; in int8 it keeps
    XNNPACK from splitting the graph at every standalone RELU. Returns how many."""
    fused = 0
    for number, subgraph in enumerate(model.subgraphs):
        kept_outputs = set(subgraph.outputs or [])
        for signature in model.signatureDefs or []:
            if signature.subgraphIndex == number:
                kept_outputs.update(m.tensorIndex for m in signature.outputs or [])
        producer, readers = {}, {}
        for operator in subgraph.operators:
            for index in operator.outputs or []:
                producer[index] = operator
            for index in operator.inputs or []:
                readers[index] = readers.get(index, 0) + 1
        dropped = set()
        for operator in subgraph.operators:
            if builtin_code(model.operatorCodes[operator.opcodeIndex]) != _RELU:
                continue
            source = operator.inputs[0]
            before = producer.get(source)
            if (
                before is None
                or builtin_code(model.operatorCodes[before.opcodeIndex]) not in _FUSABLE
                or readers.get(source) != 1
                or source in kept_outputs
                or before.builtinOptions is None
                or getattr(before.builtinOptions, "fusedActivationFunction", None)
                != _ACTIVATION_NONE
            ):
                continue
            before.builtinOptions.fusedActivationFunction = _ACTIVATION_RELU
            before.outputs = [operator.outputs[0]]
            producer[operator.outputs[0]] = before
            dropped.add(id(operator))
            fused += 1
        if dropped:
            subgraph.operators = [op for op in subgraph.operators if id(op) not in dropped]
            _drop_unused_tensors(model, number)
    return fused


def fuse_activations(source: Path, output: Path) -> Rewrite:
    """Fold standalone RELUs of ``source`` into their producers; write ``output`` if any."""
    model = read_model(source)
    done = Rewrite(fused=fuse_relu(model))
    if done.changed:
        write_model(model, output)
    return done
