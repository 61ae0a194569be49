"""Small helpers over ONNX graphs: signatures and external-data screening."""

from __future__ import annotations

import os
from pathlib import Path

from edge_runtime.manifest import TensorSpec

from .errors import ModelValidationError

# Dimension names that mean "unknown", not a name two axes can share: exporters write "?"
# (and some leave dim_param empty, or set neither field).
UNNAMED_DIMS = frozenset({"", "?"})


def _is_named(dim) -> bool:
    return dim.HasField("dim_param") and dim.dim_param.strip() not in UNNAMED_DIMS


def tensor_specs(
    value_infos, initializer_names: set[str], taken: set[str] | None = None
) -> list[TensorSpec]:
    """TensorSpecs of ``value_infos``; graph inputs that are weights are left out.

    A named dimension (``dim_param``) keeps its name, so axes that share it must agree in
    size. An unnamed or ``?`` dimension is a free dimension of its own: it gets a
    generated name (``x_dim2``) that no other axis has. ``taken`` holds the names already
    in use (the graph's own dimension names, the names generated so far) and grows.
    """
    from onnx.helper import tensor_dtype_to_np_dtype

    taken = set() if taken is None else taken
    specs = []
    for info in value_infos:
        if info.name in initializer_names:  # old exporters list weights as inputs
            continue
        tensor_type = info.type.tensor_type
        shape: list[int | str] = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(int(dim.dim_value))
            elif _is_named(dim):
                shape.append(dim.dim_param)
            else:
                shape.append(_fresh_name(f"{info.name}_dim{axis}", taken))
        dtype = tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        specs.append(TensorSpec(name=info.name, dtype=dtype, shape=shape))
    return specs


def _fresh_name(base: str, taken: set[str]) -> str:
    name, suffix = base, 1
    while name in taken:
        suffix += 1
        name = f"{base}_{suffix}"
    taken.add(name)
    return name


def model_signature(path: Path) -> tuple[list[TensorSpec], list[TensorSpec], int]:
    """Inputs, outputs and default-domain opset of an ONNX file (weights not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    taken = {
        dim.dim_param
        for info in list(model.graph.input) + list(model.graph.output)
        for dim in info.type.tensor_type.shape.dim
        if _is_named(dim)
    }
    return (
        tensor_specs(model.graph.input, initializers, taken),
        tensor_specs(model.graph.output, set(), taken),
        opset,
    )


def external_data_files(model, model_dir: Path) -> list[Path]:
    """Resolve and screen every external-data location of ``model``.

    External data must stay inside the model's folder: absolute paths, ``..`` and links
    (anywhere on the way) are refused, because loading would read files the user never
    meant to package.
    """
    from onnx.external_data_helper import uses_external_data

    root = model_dir.resolve()
    files: dict[str, Path] = {}
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors.extend(attr.t for attr in node.attribute if attr.HasField("t"))
    for tensor in tensors:
        if not uses_external_data(tensor):
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        if not location or os.path.isabs(location) or location.startswith(("/", "\\")):
            raise ModelValidationError(
                f"tensor {tensor.name!r} points at external data {location!r}: absolute paths "
                "are refused; keep external data files next to the model"
            )
        parts = Path(location).parts
        if ".." in parts:
            raise ModelValidationError(
                f"tensor {tensor.name!r} points at external data {location!r}, outside the "
                "model's folder; move the file next to the model"
            )
        candidate = model_dir
        for part in parts:
            candidate = candidate / part
            if candidate.is_symlink():
                raise ModelValidationError(
                    f"external data {location!r} of tensor {tensor.name!r} goes through a "
                    "link; copy the real file next to the model"
                )
        if not candidate.is_file():
            raise ModelValidationError(
                f"external data file {location!r} of tensor {tensor.name!r} is missing"
            )
        if root not in candidate.resolve().parents:
            raise ModelValidationError(f"external data {location!r} resolves outside {root}")
        files[location] = candidate
    return sorted(files.values())
