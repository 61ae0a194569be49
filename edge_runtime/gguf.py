"""Read and check a GGUF file's header before llama.cpp is asked to load it.

Pure Python, stdlib only, so it runs on the device. It reads the header with bounded reads
and never touches tensor data: every count and length is checked against the bytes left in
the file before it is used, so a truncated or corrupted file fails with a ModelFileError
that says what is wrong instead of crashing (or exhausting) the engine.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ModelFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # llama.cpp refuses tensor names of this many bytes or more
MAX_COUNT = 2**32
MAX_ARRAY_ITEMS_KEPT = 64  # longer arrays become a GgufArraySummary
MAX_ARRAY_DEPTH = 8

# fmt: off
# ggml type id -> (name, block size in elements, bytes per block); from gguf-py's
# GGMLQuantizationType and GGML_QUANT_SIZES (gguf 0.19.0 plus Q2_0 from llama.cpp master;
# Q8_1 is 36 bytes as in ggml-common.h, gguf 0.19.0 still says 40). 4, 5, 31-33 are retired.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4),
    27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18),
}

# general.file_type (llama_ftype) -> name; from gguf-py's LlamaFileType, with "MOSTLY_" dropped
# except in MOSTLY_F16.
GGUF_FILE_TYPES: dict[int, str] = {
    0: "ALL_F32", 1: "MOSTLY_F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
    39: "NVFP4", 40: "Q1_0", 41: "Q2_0", 1024: "GUESSED",
}

# GGUF metadata value type id -> (name, struct code); STRING and ARRAY have no fixed size.
_VALUE_TYPES: dict[int, tuple[str, str]] = {
    0: ("UINT8", "B"), 1: ("INT8", "b"), 2: ("UINT16", "H"), 3: ("INT16", "h"), 4: ("UINT32", "I"),
    5: ("INT32", "i"), 6: ("FLOAT32", "f"), 7: ("BOOL", "?"), 8: ("STRING", ""), 9: ("ARRAY", ""),
    10: ("UINT64", "Q"), 11: ("INT64", "q"), 12: ("FLOAT64", "d"),
}
# fmt: on
_UINT32, _STRING, _ARRAY = 4, 8, 9
_SCALARS = {t: struct.Struct("<" + code) for t, (_, code) in _VALUE_TYPES.items() if code}
_MIN_VALUE_BYTES = {_STRING: 8, _ARRAY: 12, **{t: s.size for t, s in _SCALARS.items()}}
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor_count, kv_count
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset

_FIX = "re-export or re-download the model"
_FIX_TRUNCATED = "the file is incomplete (interrupted download or copy?); " + _FIX
_LEGACY = "a legacy llama.cpp GGML/GGJT file; convert it to GGUF with llama.cpp's convert scripts"
_HF = "convert it to GGUF with llama.cpp's convert_hf_to_gguf.py"


def _q(text: str, limit: int = 60) -> str:
    """A key or name for an error message; a corrupted one can be megabytes long."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def gguf_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The general.* and tokenizer.* values of a GGUF header that are strings, numbers or
    booleans: what ``Runtime.metadata`` shows (arrays such as the token list are left out)."""
    return {
        key: value
        for key, value in metadata.items()
        if key.startswith(("general.", "tokenizer.")) and isinstance(value, str | int | float)
    }


def file_type_name(value: int | None) -> str:
    """The llama_ftype name for a ``general.file_type`` value, e.g. 15 -> "Q4_K_M"."""
    if value is None:
        return "unknown"
    return GGUF_FILE_TYPES.get(value, f"unknown ({value})")


@dataclass(frozen=True)
class GgufTensor:
    name: str
    shape: tuple[int, ...]  # ggml order (ne[0] first, the row length), as stored in the file
    ggml_type: int
    type_name: str
    offset: int  # relative to GgufInfo.data_offset
    nbytes: int
    n_elements: int


@dataclass(frozen=True)
class GgufArraySummary:
    """Stands in for a metadata array too long to keep (e.g. 49k tokenizer tokens)."""

    item_type: str
    length: int


@dataclass(frozen=True)
class GgufInfo:
    path: Path
    version: int
    file_size: int
    alignment: int
    data_offset: int
    metadata: dict[str, Any]
    tensors: list[GgufTensor]

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    @property
    def file_type(self) -> int | None:
        value = self.metadata.get("general.file_type")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def n_parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def weight_type_name(self) -> str:
        """The ggml type holding the most bytes among matrices ("" when there are no tensors)."""
        totals: dict[str, int] = {}
        for t in [t for t in self.tensors if len(t.shape) >= 2] or self.tensors:
            totals[t.type_name] = totals.get(t.type_name, 0) + t.nbytes
        return max(totals, key=totals.__getitem__) if totals else ""

    def arch_value(self, key: str, default: Any = None) -> Any:
        """``metadata[f"{architecture}.{key}"]``, e.g. ``arch_value("context_length")``."""
        if self.architecture is None:
            return default
        return self.metadata.get(f"{self.architecture}.{key}", default)


class _Reader:
    """Bounded little-endian reads: nothing is read, skipped or allocated past the file end."""

    def __init__(self, f: BinaryIO, path: Path, size: int, max_string_bytes: int) -> None:
        self.f, self.path, self.size, self.max_string_bytes = f, path, size, max_string_bytes
        self.pos = 0

    def fail(self, problem: str, fix: str = _FIX) -> ModelFileError:
        return ModelFileError(f"{self.path}: {problem}; {fix}")

    def _claim(self, n: int) -> int:
        end = self.pos + n
        if end > self.size:
            raise self.fail(
                f"truncated: header ends at byte {end} but the file is {self.size} bytes",
                _FIX_TRUNCATED,
            )
        return end

    def read(self, n: int) -> bytes:
        end = self._claim(n)
        data = self.f.read(n)
        if len(data) != n:
            raise self.fail(f"the file shrank while being read (at byte {self.pos})")
        self.pos = end
        return data

    def skip(self, n: int) -> None:
        self.pos = self._claim(n)
        self.f.seek(self.pos)

    def unpack(self, st: struct.Struct) -> Any:
        return st.unpack(self.read(st.size))[0]

    def string(self, what: str, keep: bool = True) -> str:
        start = self.pos
        n = self.unpack(_U64)
        if n > self.max_string_bytes:
            raise self.fail(
                f"{what} at byte {start} is {n} bytes long, over the limit of "
                f"{self.max_string_bytes} bytes; the file is corrupted"
            )
        if n > self.size - self.pos:
            raise self.fail(
                f"{what} at byte {start} claims {n} bytes but only {self.size - self.pos} "
                "remain in the file; it is truncated or corrupted"
            )
        if not keep:
            self.skip(n)
            return ""
        try:
            return self.read(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} at byte {start} is not valid UTF-8 ({exc.reason})") from None

    def value(self, vtype: int, label: str, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string(f"value of {label}")
        if vtype == _ARRAY:
            return self.array(label, depth + 1)
        if vtype not in _SCALARS:
            raise self.fail(f"{label} has unknown value type {vtype} (known: 0-12)")
        return self.unpack(_SCALARS[vtype])

    def array(self, label: str, depth: int) -> list[Any] | GgufArraySummary:
        if depth > MAX_ARRAY_DEPTH:
            raise self.fail(f"array {label} is nested more than {MAX_ARRAY_DEPTH} levels deep")
        item_type, length = self.unpack(_U32), self.unpack(_U64)
        if item_type not in _VALUE_TYPES:
            raise self.fail(f"array {label} has unknown item type {item_type} (known: 0-12)")
        type_name, min_bytes = _VALUE_TYPES[item_type][0], _MIN_VALUE_BYTES[item_type]
        if length * min_bytes > self.size - self.pos:
            raise self.fail(
                f"array {label} claims {length} {type_name} items (at least {length * min_bytes}"
                f" bytes) but only {self.size - self.pos} bytes remain; the file is truncated "
                "or corrupted"
            )
        keep = length <= MAX_ARRAY_ITEMS_KEPT
        if item_type in _SCALARS:  # fixed size: one read, or one seek when not kept
            if not keep:
                self.skip(length * min_bytes)
                return GgufArraySummary(type_name, length)
            code = _VALUE_TYPES[item_type][1]
            return list(struct.unpack(f"<{length}{code}", self.read(length * min_bytes)))
        if item_type == _STRING:
            items = [self.string(f"{label}[{i}]", keep) for i in range(length)]
        else:
            items = [self.array(f"{label}[{i}]", depth + 1) for i in range(length)]
        return items if keep else GgufArraySummary(type_name, length)


def _describe_other_format(head: bytes) -> str:
    """What a file with the wrong magic probably is, and what to do about it."""
    if head[:4] in (b"ggml", b"ggmf", b"ggjt", b"lmgg", b"fmgg", b"tjgg"):
        return f"it looks like {_LEGACY}"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the model; fetch the real file (git lfs pull)"
    if head.startswith(b"PK\x03\x04"):
        return f"it is a ZIP archive (a PyTorch checkpoint?); {_HF}"
    if head[8:9] == b"{":
        return f"it looks like a safetensors file; {_HF}"
    if head[4:8] == b"TFL3":
        return "it is a TFLite model; package it for the TFLite backend instead"
    if head.lstrip()[:1] in (b"<", b"{"):
        return "it is a text (HTML/JSON) file, probably an error page from a failed download"
    return _FIX


def _header(r: _Reader) -> tuple[int, int, int]:
    head = r.f.read(_HEADER.size)
    if not head:
        raise r.fail("the file is empty (0 bytes)", _FIX_TRUNCATED)
    if len(head) >= 4 and head[:4] != GGUF_MAGIC:
        raise r.fail(
            f"not a GGUF file: bad magic {head[:4]!r} (expected {GGUF_MAGIC!r})",
            _describe_other_format(head),
        )
    r.f.seek(0)
    _, version, tensor_count, kv_count = _HEADER.unpack(r.read(_HEADER.size))
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in SUPPORTED_VERSIONS:  # llama.cpp's hint: a byte-swapped version number
            problem = f"big-endian GGUF (version {swapped}); devices read little-endian files"
        else:
            problem = f"GGUF version {version} is not supported (this runtime reads 2 and 3)"
        raise r.fail(problem, "re-convert the model with a current llama.cpp")
    room = r.size - r.pos
    for count, what, min_bytes in (
        (tensor_count, "tensors", _MIN_TENSOR_INFO_BYTES),
        (kv_count, "metadata key/value pairs", _MIN_KV_BYTES),
    ):
        if count > MAX_COUNT or count * min_bytes > room:
            raise r.fail(
                f"the header claims {count} {what}, which cannot fit in a file of {r.size} "
                f"bytes (each needs at least {min_bytes}); the header is corrupted"
            )
    return version, tensor_count, kv_count


def _metadata(r: _Reader, kv_count: int) -> tuple[dict[str, Any], int]:
    metadata: dict[str, Any] = {}
    alignment = DEFAULT_ALIGNMENT
    for i in range(kv_count):
        key = r.string(f"metadata key #{i}")
        if not key:
            raise r.fail(f"metadata key #{i} is empty")
        if key in metadata:
            raise r.fail(f"metadata key {_q(key)} appears twice")
        vtype = r.unpack(_U32)
        metadata[key] = r.value(vtype, _q(key))
        if key == "general.alignment":
            alignment = metadata[key]
            if vtype != _UINT32 or alignment <= 0 or alignment & (alignment - 1):
                raise r.fail(f"general.alignment must be a UINT32 power of two, not {alignment!r}")
    return metadata, alignment


def _tensor_infos(r: _Reader, tensor_count: int, alignment: int) -> list[GgufTensor]:
    tensors: dict[str, GgufTensor] = {}
    for i in range(tensor_count):
        name = r.string(f"name of tensor #{i}")
        if len(name.encode()) >= GGML_MAX_NAME:
            raise r.fail(f"tensor name {_q(name)} is longer than {GGML_MAX_NAME - 1} bytes")
        if name in tensors:
            raise r.fail(f"tensor {name!r} appears twice")
        n_dims = r.unpack(_U32)
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise r.fail(f"tensor {name!r} has {n_dims} dimensions (must be 1-{GGML_MAX_DIMS})")
        shape = tuple(r.unpack(_U64) for _ in range(n_dims))
        if not all(0 < d < 2**63 for d in shape):
            raise r.fail(
                f"tensor {name!r} has invalid shape {shape}: dimensions must be 1 to 2**63-1"
            )
        ggml_type = r.unpack(_U32)
        if ggml_type not in GGML_TYPES:
            raise r.fail(
                f"tensor {name!r} has unknown ggml type id {ggml_type}",
                "the file is corrupted or needs a newer runtime; " + _FIX,
            )
        type_name, block_size, type_size = GGML_TYPES[ggml_type]
        if shape[0] % block_size:
            raise r.fail(
                f"tensor {name!r} of type {type_name} has rows of {shape[0]} elements, "
                f"not a multiple of the block size {block_size}"
            )
        offset = r.unpack(_U64)
        if offset % alignment:
            raise r.fail(f"tensor {name!r} offset {offset} is not a multiple of {alignment}")
        n_elements = math.prod(shape)
        nbytes = n_elements // block_size * type_size
        tensors[name] = GgufTensor(name, shape, ggml_type, type_name, offset, nbytes, n_elements)
    return list(tensors.values())


def _check_data(r: _Reader, tensors: list[GgufTensor], data_offset: int, alignment: int) -> None:
    expected = 0
    for t in tensors:
        end = data_offset + t.offset + t.nbytes
        if end > r.size:
            raise r.fail(
                f"tensor {t.name!r} data ends at byte {end} but the file is {r.size} bytes: "
                "the file is truncated or corrupted"
            )
        if t.offset != expected:  # llama.cpp needs the data in order, each tensor padded
            raise r.fail(f"tensor {t.name!r} data is at offset {t.offset}, expected {expected}")
        expected += -(-t.nbytes // alignment) * alignment


def read_gguf(path: str | Path, *, max_string_bytes: int = 16 * 2**20) -> GgufInfo:
    """Read and validate a GGUF file's header, without reading tensor data.

    Args:
        path: The ``.gguf`` file.
        max_string_bytes: Longest metadata string or tensor name accepted; a longer one means
            the file is corrupted (a chat template or token is far shorter).

    Returns:
        The header: version, alignment, where tensor data starts, the metadata (arrays of
        more than 64 items as GgufArraySummary) and every tensor's shape, type and size.

    Raises:
        ModelFileError: The path is not a readable file, or the file is not GGUF, is an
            unsupported version, is truncated, or its header is inconsistent. The message
            names the file, the problem and what to do.
    """
    path = Path(path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise ModelFileError(f"{path}: is a directory, not a GGUF file; name the .gguf file")
        if not stat.S_ISREG(st.st_mode):
            raise ModelFileError(f"{path}: is not a regular file; name the .gguf file")
        f = open(path, "rb")  # noqa: SIM115 - closed by the with-block below
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file; check the model path") from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot open ({exc.strerror}); check the path") from None
    with f:
        r = _Reader(f, path, os.fstat(f.fileno()).st_size, max_string_bytes)
        try:
            version, tensor_count, kv_count = _header(r)
            metadata, alignment = _metadata(r, kv_count)
            tensors = _tensor_infos(r, tensor_count, alignment)
        except OSError as exc:
            raise r.fail(f"read failed at byte {r.pos} ({exc.strerror})") from None
    data_offset = -(-r.pos // alignment) * alignment
    _check_data(r, tensors, data_offset, alignment)
    return GgufInfo(path, version, r.size, alignment, data_offset, metadata, tensors)
