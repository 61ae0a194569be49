"""A bounds-checked walk over a TFLite (LiteRT) flatbuffer, before any interpreter sees it.

``ai_edge_litert`` verifies a flatbuffer when it loads one, but ``tflite_runtime`` (the
wheel many Raspberry Pi images still carry) does not: a truncated or corrupted file
crashes the process with SIGSEGV. This reader follows every offset the interpreter will
follow (model, subgraphs, tensors, operators, buffers, signatures) and refuses anything
that points outside the file, so both interpreters get a clear ``ModelFileError`` instead.

It reads only what it checks, with the standard library: the device needs no
``flatbuffers`` package. Layout: https://flatbuffers.dev/internals/ and LiteRT's
``schema.fbs`` (field numbers below).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelFileError

IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3
# TensorType enum values in schema.fbs, for the facts the packager reports.
TENSOR_TYPES = {
    0: "float32",
    1: "float16",
    2: "int32",
    3: "uint8",
    4: "int64",
    5: "string",
    6: "bool",
    7: "int16",
    8: "complex64",
    9: "int8",
    10: "float64",
    11: "complex128",
    12: "uint64",
    13: "resource",
    14: "variant",
    15: "uint32",
    16: "uint16",
    17: "int4",
    18: "bfloat16",
}
# Magic bytes of formats people hand over by mistake, to say what the file looks like.
_LOOKALIKES = [
    (b"GGUF", "a GGUF model (use the .gguf suffix)"),
    (b"PK\x03\x04", "a zip archive (a PyTorch checkpoint, a Keras .keras file or a .task bundle?)"),
    (b"\x89HDF", "an HDF5 file (a Keras .h5 model? convert it with the LiteRT converter)"),
    (b"\x80", "a Python pickle (refused: loading it can run code)"),
    (b"\x08", "a protobuf, probably ONNX (use the .onnx suffix)"),
]
# Model table fields
_M_VERSION, _M_OPCODES, _M_SUBGRAPHS, _M_DESCRIPTION, _M_BUFFERS = 0, 1, 2, 3, 4
_M_METADATA, _M_SIGNATURES = 6, 7
# SubGraph, Tensor, Buffer, SignatureDef, TensorMap fields
_SG_TENSORS, _SG_INPUTS, _SG_OUTPUTS, _SG_OPERATORS = 0, 1, 2, 3
_T_SHAPE, _T_TYPE, _T_BUFFER, _T_NAME = 0, 1, 2, 3
_OP_INPUTS, _OP_OUTPUTS = 1, 2
_B_DATA, _B_OFFSET, _B_SIZE = 0, 1, 2
_SIG_INPUTS, _SIG_OUTPUTS, _SIG_KEY = 0, 1, 2
_TM_NAME, _TM_TENSOR = 0, 1
_MD_NAME, _MD_BUFFER = 0, 1


@dataclass(frozen=True)
class TfliteFacts:
    """What the walk found: enough to describe the model and spot a quantized one."""

    version: int
    description: str
    subgraphs: int
    operators: int
    tensors: int
    buffers: int
    weight_bytes: int
    # One past the last byte any table, vector or string uses: a cut below it is refused.
    extent: int
    signatures: list[str] = field(default_factory=list)
    # Tensor types of constant tensors (weights), with their counts: int8 weights mean the
    # model is already quantized.
    weight_types: dict[str, int] = field(default_factory=dict)
    # The model's metadata entries (name -> the bytes of the buffer it names), e.g. the
    # converter's "min_runtime_version" or a label map a model keeps there.
    metadata: dict[str, bytes] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return any(t in self.weight_types for t in ("int8", "uint8", "int16", "int4"))


class _Reader:
    """Bounds-checked flatbuffer primitives over a byte buffer."""

    def __init__(self, data, name: str) -> None:
        self.data = data
        self.size = len(data)
        self.name = name
        self.extent = 0

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(
            f"{self.name}: not a valid TFLite model: {what} (the file is truncated or "
            "corrupted; convert or copy it again)"
        )

    def _unpack(self, fmt: str, pos: int, what: str):
        width = struct.calcsize(fmt)
        if pos < 0 or pos + width > self.size:
            raise self.fail(f"{what} at byte {pos} lies outside the {self.size}-byte file")
        self.extent = max(self.extent, pos + width)
        return struct.unpack_from(fmt, self.data, pos)[0]

    def u8(self, pos: int, what: str) -> int:
        return self._unpack("<B", pos, what)

    def u32(self, pos: int, what: str) -> int:
        return self._unpack("<I", pos, what)

    def i32(self, pos: int, what: str) -> int:
        return self._unpack("<i", pos, what)

    def u64(self, pos: int, what: str) -> int:
        return self._unpack("<Q", pos, what)

    def table(self, pos: int, what: str) -> _Table:
        vtable = pos - self.i32(pos, what)
        vtable_size = self._unpack("<H", vtable, f"{what} vtable")
        if vtable_size < 4 or vtable_size % 2 or vtable + vtable_size > self.size:
            raise self.fail(f"{what} has a malformed vtable")
        table_size = self._unpack("<H", vtable + 2, f"{what} vtable")
        if pos + table_size > self.size:
            raise self.fail(f"{what} runs past the end of the file")
        return _Table(self, pos, vtable, vtable_size, table_size, what)

    def vector(self, pos: int, element: int, what: str) -> tuple[int, int]:
        """(first element position, length) of the vector at ``pos``."""
        length = self.u32(pos, f"{what} length")
        if pos + 4 + length * element > self.size:
            raise self.fail(f"{what} ({length} entries) runs past the end of the file")
        self.extent = max(self.extent, pos + 4 + length * element)
        return pos + 4, length

    def string(self, pos: int, what: str) -> str:
        start, length = self.vector(pos, 1, what)
        try:
            return bytes(self.data[start : start + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None


@dataclass
class _Table:
    reader: _Reader
    pos: int
    vtable: int
    vtable_size: int
    table_size: int
    what: str

    def _field(self, index: int) -> int | None:
        slot = 4 + 2 * index
        if slot >= self.vtable_size:
            return None
        offset = self.reader._unpack("<H", self.vtable + slot, f"{self.what} vtable")
        if offset == 0:
            return None
        if offset >= self.table_size:
            raise self.reader.fail(f"{self.what} field {index} lies outside its table")
        return self.pos + offset

    def scalar(self, index: int, kind: str, default: int = 0) -> int:
        pos = self._field(index)
        if pos is None:
            return default
        return getattr(self.reader, kind)(pos, f"{self.what} field {index}")

    def ref(self, index: int) -> int | None:
        """Position of the table, vector or string that field ``index`` points to."""
        pos = self._field(index)
        if pos is None:
            return None
        return pos + self.reader.u32(pos, f"{self.what} field {index}")

    def tables(self, index: int, what: str) -> list[_Table]:
        pos = self.ref(index)
        if pos is None:
            return []
        start, length = self.reader.vector(pos, 4, what)
        return [
            self.reader.table(
                start + 4 * i + self.reader.u32(start + 4 * i, f"{what}[{i}]"), f"{what}[{i}]"
            )
            for i in range(length)
        ]

    def ints(self, index: int, what: str) -> list[int]:
        pos = self.ref(index)
        if pos is None:
            return []
        start, length = self.reader.vector(pos, 4, what)
        return [self.reader.i32(start + 4 * i, what) for i in range(length)]

    def string(self, index: int, what: str) -> str | None:
        pos = self.ref(index)
        return None if pos is None else self.reader.string(pos, what)


def describe_magic(head: bytes) -> str:
    """What a file that is not a TFLite flatbuffer looks like, from its first bytes."""
    for magic, looks_like in _LOOKALIKES:
        if head.startswith(magic):
            return looks_like
    return "an unknown format"


def check_tflite(path: Path) -> TfliteFacts:
    """Walk ``path`` and return its facts, or raise ``ModelFileError`` saying what is wrong.

    Raises:
        ModelFileError: missing, empty, not a TFLite flatbuffer, or any offset points
            outside the file (truncated or corrupted).
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror}") from None
    with handle:
        size = path.stat().st_size
        if size < 8:
            raise ModelFileError(
                f"{path.name}: {size} bytes is too short for a TFLite model (truncated?)"
            )
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[4:8] != IDENTIFIER:
                raise ModelFileError(
                    f"{path.name}: not a TFLite model (no 'TFL3' identifier); it looks like "
                    f"{describe_magic(bytes(data[:8]))}"
                )
            return _walk(_Reader(data, path.name))


def _walk(reader: _Reader) -> TfliteFacts:
    model = reader.table(reader.u32(0, "root offset"), "model")
    version = model.scalar(_M_VERSION, "u32")
    if version != SCHEMA_VERSION:
        raise reader.fail(f"schema version {version}, expected {SCHEMA_VERSION}")
    buffers = model.tables(_M_BUFFERS, "buffers")
    buffer_bytes, buffer_starts, weight_bytes = [], [], 0
    for index, buffer in enumerate(buffers):
        nbytes = start = 0
        data = buffer.ref(_B_DATA)
        if data is not None:
            start, nbytes = reader.vector(data, 1, f"buffer {index} data")
        # Models over 2 GB keep weights after the flatbuffer: offset and size from file start.
        offset = buffer.scalar(_B_OFFSET, "u64")
        if offset > 1:
            nbytes = buffer.scalar(_B_SIZE, "u64")
            if offset + nbytes > reader.size:
                raise reader.fail(f"buffer {index} data runs past the end of the file")
            reader.extent = max(reader.extent, offset + nbytes)
            start = offset
        buffer_bytes.append(nbytes)
        buffer_starts.append(start)
        weight_bytes += nbytes
    opcodes = model.tables(_M_OPCODES, "operator codes")
    subgraphs = model.tables(_M_SUBGRAPHS, "subgraphs")
    if not subgraphs:
        raise reader.fail("the model has no subgraph")
    tensors = operators = 0
    weight_types: dict[str, int] = {}
    for number, subgraph in enumerate(subgraphs):
        where = f"subgraph {number}"
        tensor_tables = subgraph.tables(_SG_TENSORS, f"{where} tensors")
        tensors += len(tensor_tables)
        for index, tensor in enumerate(tensor_tables):
            tensor.ints(_T_SHAPE, f"{where} tensor {index} shape")
            tensor.string(_T_NAME, f"{where} tensor {index} name")
            buffer = tensor.scalar(_T_BUFFER, "u32")
            if buffer >= max(len(buffers), 1):
                raise reader.fail(f"{where} tensor {index} names buffer {buffer} of {len(buffers)}")
            if buffer and buffer_bytes[buffer]:
                kind = TENSOR_TYPES.get(tensor.scalar(_T_TYPE, "u8"), "unknown")
                weight_types[kind] = weight_types.get(kind, 0) + 1
        count = len(tensor_tables)
        _check_indices(reader, subgraph.ints(_SG_INPUTS, f"{where} inputs"), count, where)
        _check_indices(reader, subgraph.ints(_SG_OUTPUTS, f"{where} outputs"), count, where)
        for index, operator in enumerate(subgraph.tables(_SG_OPERATORS, f"{where} operators")):
            operators += 1
            if operator.scalar(0, "u32") >= len(opcodes):
                raise reader.fail(f"{where} operator {index} has an unknown operator code")
            for slot in (_OP_INPUTS, _OP_OUTPUTS):
                _check_indices(
                    reader, operator.ints(slot, f"{where} operator {index}"), count, where
                )
    signatures = []
    for index, signature in enumerate(model.tables(_M_SIGNATURES, "signatures")):
        for slot in (_SIG_INPUTS, _SIG_OUTPUTS):
            for tensor_map in signature.tables(slot, f"signature {index} tensors"):
                tensor_map.string(_TM_NAME, f"signature {index} tensor name")
        signatures.append(signature.string(_SIG_KEY, f"signature {index} key") or "")
    metadata = {}
    for index, entry in enumerate(model.tables(_M_METADATA, "metadata")):
        name = entry.string(_MD_NAME, f"metadata {index} name") or ""
        buffer = entry.scalar(_MD_BUFFER, "u32")
        if buffer >= len(buffers):
            raise reader.fail(f"metadata {name!r} names buffer {buffer} of {len(buffers)}")
        start = buffer_starts[buffer]
        metadata[name] = bytes(reader.data[start : start + buffer_bytes[buffer]])
    return TfliteFacts(
        version=version,
        description=model.string(_M_DESCRIPTION, "description") or "",
        subgraphs=len(subgraphs),
        operators=operators,
        tensors=tensors,
        buffers=len(buffers),
        weight_bytes=weight_bytes,
        extent=reader.extent,
        signatures=signatures,
        weight_types=dict(sorted(weight_types.items())),
        metadata=metadata,
    )


def _check_indices(reader: _Reader, indices: list[int], count: int, where: str) -> None:
    # -1 marks an optional input that is absent.
    bad = [index for index in indices if index < -1 or index >= count]
    if bad:
        raise reader.fail(f"{where} refers to tensor {bad[0]} of {count}")
