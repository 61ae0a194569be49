"""Small helpers over ONNX graphs: signatures and external-data screening."""

from __future__ import annotations

import os
from pathlib import Path

from edge_runtime.manifest import TensorSpec

from .errors import ModelValidationError


def tensor_specs(value_infos, initializer_names: set[str]) -> list[TensorSpec]:
    from onnx.helper import tensor_dtype_to_np_dtype

    specs = []
    for info in value_infos:
        if info.name in initializer_names:  # old exporters list weights as inputs
            continue
        tensor_type = info.type.tensor_type
        shape: list[int | str] = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(int(dim.dim_value))
            else:
                shape.append(dim.dim_param or f"{info.name}_dim{axis}")
        dtype = tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        specs.append(TensorSpec(name=info.name, dtype=dtype, shape=shape))
    return specs


def model_signature(path: Path) -> tuple[list[TensorSpec], list[TensorSpec], int]:
    """Inputs, outputs and default-domain opset of an ONNX file (weights not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return (
        tensor_specs(model.graph.input, initializers),
        tensor_specs(model.graph.output, set()),
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
