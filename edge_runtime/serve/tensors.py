"""Tensors on the wire: Open Inference Protocol datatypes, and arrays from JSON or raw bytes.

Shared by the REST and gRPC front ends, so both refuse the same inputs with the same
words. Every refusal is a ``BadRequest`` naming the input and what was expected.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..manifest import TensorSpec
from .protocol import BadRequest, TensorMetadata

# OIP datatype -> numpy dtype (little-endian, as the binary extension and gRPC send them).
NUMPY_OF_DATATYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPE_OF_NUMPY = {dtype.name: datatype for datatype, dtype in NUMPY_OF_DATATYPE.items()}
KNOWN_DATATYPES = (*NUMPY_OF_DATATYPE, "BF16", "BYTES")
MAX_RANK = 16


def datatype_of(dtype: str) -> str:
    """The OIP datatype of a manifest's numpy dtype name (``float32`` -> ``FP32``)."""
    return DATATYPE_OF_NUMPY.get(np.dtype(dtype).name, dtype.upper())


def tensor_metadata(spec: TensorSpec) -> TensorMetadata:
    """A manifest tensor as OIP metadata: named (free) dimensions become -1."""
    shape = [dim if isinstance(dim, int) else -1 for dim in spec.shape]
    return TensorMetadata(name=spec.name, datatype=datatype_of(spec.dtype), shape=shape)


def check_datatype(meta: TensorMetadata, datatype: Any) -> np.dtype:
    """The numpy dtype for input ``meta`` sent as ``datatype``; refuses a wrong one."""
    if not isinstance(datatype, str) or datatype not in KNOWN_DATATYPES:
        raise BadRequest(
            f"input {meta.name!r}: datatype {datatype!r} is not an Open Inference Protocol "
            f"datatype ({', '.join(KNOWN_DATATYPES)}); the model takes {meta.datatype}"
        )
    if datatype != meta.datatype:
        raise BadRequest(f"input {meta.name!r} is {meta.datatype} in the model, not {datatype}")
    dtype = NUMPY_OF_DATATYPE.get(datatype)
    if dtype is None:
        raise BadRequest(f"input {meta.name!r}: datatype {datatype} is not served here")
    return dtype


def check_shape(meta: TensorMetadata, shape: Any) -> tuple[int, ...]:
    """A request's ``shape``: a list of sizes >= 0 matching the model's fixed dimensions."""
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(isinstance(dim, int) and not isinstance(dim, bool) for dim in shape)
        or any(dim < 0 for dim in shape)
    ):
        raise BadRequest(
            f"input {meta.name!r}: shape {shape!r} must be a list of sizes >= 0, "
            f"like the model's {meta.shape} (-1: any size)"
        )
    if len(shape) != len(meta.shape):
        raise BadRequest(
            f"input {meta.name!r} has shape {shape}, of rank {len(shape)}; the model takes "
            f"rank {len(meta.shape)}: {meta.shape} (-1: any size)"
        )
    for axis, (size, want) in enumerate(zip(shape, meta.shape, strict=True)):
        if want != -1 and size != want:
            raise BadRequest(
                f"input {meta.name!r} has size {size} on axis {axis}; the model takes "
                f"{meta.shape} (-1: any size)"
            )
    return tuple(shape)


def array_from_bytes(
    meta: TensorMetadata, dtype: np.dtype, shape: tuple[int, ...], raw: bytes | memoryview
) -> np.ndarray:
    """The array held by ``raw`` (row major, little-endian); its length must match."""
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise BadRequest(
            f"input {meta.name!r}: {len(raw)} bytes of data, but shape {list(shape)} of "
            f"{meta.datatype} needs {expected}"
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    # The engine wants the native byte order; the copy also frees the request's body.
    return array.astype(dtype.newbyteorder("="), copy=True)


def array_from_json(
    meta: TensorMetadata, dtype: np.dtype, shape: tuple[int, ...], data: Any
) -> np.ndarray:
    """The array of a JSON ``data`` list (flat or nested, row major)."""
    if not isinstance(data, list):
        raise BadRequest(f"input {meta.name!r}: data must be a list of numbers")
    expected = math.prod(shape)
    try:
        flat = np.asarray(_flatten(data, meta), dtype=object)
        if len(flat) != expected:
            raise BadRequest(
                f"input {meta.name!r}: {len(flat)} values of data, but shape {list(shape)} "
                f"needs {expected}"
            )
        if dtype.kind == "b":
            if not all(isinstance(value, bool) for value in flat):
                raise BadRequest(f"input {meta.name!r}: BOOL data must be true or false")
        elif not all(_number(value, dtype) for value in flat):
            kind = "integers" if dtype.kind in "iu" else "numbers"
            raise BadRequest(f"input {meta.name!r}: {meta.datatype} data must be {kind}")
        return np.asarray(flat.tolist(), dtype=dtype).reshape(shape)
    except OverflowError:
        raise BadRequest(f"input {meta.name!r}: a value does not fit {meta.datatype}") from None


def _number(value: Any, dtype: np.dtype) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if dtype.kind in "iu" else isinstance(value, (int, float))


def _flatten(data: list, meta: TensorMetadata) -> list:
    """Nested lists, row major, into one list; depth bounded (no recursion bomb)."""
    flat: list = []
    stack = [(iter(data), 0)]
    while stack:
        items, depth = stack[-1]
        for item in items:
            if isinstance(item, list):
                if depth + 1 > MAX_RANK:
                    raise BadRequest(f"input {meta.name!r}: data is nested too deeply")
                stack.append((iter(item), depth + 1))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def output_json(array: np.ndarray) -> list:
    """An output's data as the flat, row-major JSON list OIP sends."""
    return array.ravel().tolist()


def output_bytes(array: np.ndarray) -> bytes:
    """An output's data for the binary extension: row major, little-endian."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
