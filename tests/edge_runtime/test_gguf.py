"""edge_runtime.gguf against real GGUF files written by the gguf package's GGUFWriter.

Every refusal starts from a valid file and corrupts the bytes a bad download, a bad
converter or a flipped bit would; positions are found from the file's own bytes.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from edge_runtime.errors import EdgeRuntimeError, ModelFileError  # noqa: E402
from edge_runtime.gguf import (  # noqa: E402
    GGML_TYPES,
    GGUF_FILE_TYPES,
    GgufArraySummary,
    GgufInfo,
    GgufTensor,
    file_type_name,
    read_gguf,
)

Q4_1 = gguf.GGMLQuantizationType.Q4_1
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
)
TOKENS = [f"tok{i}" for i in range(100)]
# name -> (numpy shape of the source, ggml type, GGUF shape (ne[0] first), nbytes)
TENSORS = {
    "token_embd.weight": ((32, 64), "F16", (64, 32), 32 * 64 * 2),
    "blk.0.attn_q.weight": ((64, 64), "Q4_1", (64, 64), 64 * 2 * 20),
    "blk.0.attn_k.weight": ((64, 64), "Q4_1", (64, 64), 64 * 2 * 20),
    "blk.0.ffn_up.weight": ((128, 64), "Q4_1", (64, 128), 128 * 2 * 20),
    "output_norm.weight": ((64,), "F32", (64,), 64 * 4),
}


def _write_gguf(path: Path, *, alignment: int | None = None, n_tokens: int = 100) -> Path:
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_uint32("tiny.int_a", 42)
    writer.add_int64("tiny.int_b", -7)
    writer.add_bool("tiny.flag", True)
    writer.add_array("tiny.scores", [0.5, 1.5])
    writer.add_array("tiny.nested", [[1, 2], [3]])
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_token_list(TOKENS if n_tokens == 100 else [f"t{i}" for i in range(n_tokens)])
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for name, (shape, type_name, _, _) in TENSORS.items():
        values = rng.standard_normal(shape).astype(np.float32)
        if type_name == "Q4_1":
            writer.add_tensor(name, gguf.quants.quantize(values, Q4_1), raw_dtype=Q4_1)
        else:
            writer.add_tensor(name, values.astype(np.float16 if type_name == "F16" else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def gguf_path(tmp_path_factory) -> Path:
    return _write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def gguf_bytes(gguf_path) -> bytes:
    return gguf_path.read_bytes()


def _key_pos(data: bytes, key: str) -> int:
    """Byte position of the value type (u32) that follows ``key`` in the metadata."""
    raw = key.encode()
    return data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)


def _tensor_pos(data: bytes, name: str) -> dict[str, int]:
    """Byte positions of one tensor info's fields."""
    raw = name.encode()
    start = data.index(struct.pack("<Q", len(raw)) + raw)
    n_dims_at = start + 8 + len(raw)
    (n_dims,) = struct.unpack_from("<I", data, n_dims_at)
    type_at = n_dims_at + 4 + 8 * n_dims
    return {"start": start, "n_dims": n_dims_at, "dims": n_dims_at + 4, "type": type_at,
            "offset": type_at + 4}  # fmt: skip


def _patched(data: bytes, at: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def _refusal(path: Path, **kwargs) -> str:
    """read_gguf's error message, checked to name the file."""
    with pytest.raises(ModelFileError) as exc_info:
        read_gguf(path, **kwargs)
    message = str(exc_info.value)
    assert str(path) in message
    return message


def _refusal_of(tmp_path: Path, data: bytes, **kwargs) -> str:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    return _refusal(path, **kwargs)


# --- reading a valid file ------------------------------------------------------------------


def test_reads_metadata(gguf_path):
    info = read_gguf(gguf_path)

    assert info.path == gguf_path
    assert (info.version, info.alignment) == (3, 32)
    assert info.file_size == gguf_path.stat().st_size
    assert info.architecture == "llama"
    assert info.metadata["general.name"] == "tiny"
    assert info.file_type == 3 and file_type_name(info.file_type) == "Q4_1"
    assert info.arch_value("context_length") == 128
    assert info.arch_value("embedding_length") == 64
    assert info.arch_value("missing", default=-1) == -1
    assert info.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert info.metadata["tiny.int_a"] == 42 and info.metadata["tiny.int_b"] == -7
    assert info.metadata["tiny.flag"] is True
    assert info.metadata["tiny.scores"] == [0.5, 1.5]
    assert info.metadata["tiny.nested"] == [[1, 2], [3]]


def test_long_arrays_are_summarized_not_kept(gguf_path):
    info = read_gguf(gguf_path)

    assert info.metadata["tokenizer.ggml.tokens"] == GgufArraySummary("STRING", 100)


def test_reads_tensor_infos(gguf_path):
    info = read_gguf(gguf_path)

    assert [t.name for t in info.tensors] == list(TENSORS)
    for tensor in info.tensors:
        _, type_name, shape, nbytes = TENSORS[tensor.name]
        assert (tensor.shape, tensor.type_name, tensor.nbytes) == (shape, type_name, nbytes)
        assert GGML_TYPES[tensor.ggml_type][0] == type_name
        assert tensor.n_elements == int(np.prod(shape))
    assert [t.offset for t in info.tensors] == [0, 4096, 6656, 9216, 14336]
    assert info.n_parameters == 64 * 32 + 2 * 64 * 64 + 64 * 128 + 64
    assert info.weight_type_name == "Q4_1"
    assert info.data_offset % 32 == 0


def test_agrees_with_the_gguf_package_reader(gguf_path):
    reference = gguf.GGUFReader(gguf_path)

    info = read_gguf(gguf_path)

    assert info.data_offset == reference.data_offset
    assert [(t.name, info.data_offset + t.offset, t.nbytes) for t in info.tensors] == [
        (t.name, int(t.data_offset), int(t.n_bytes)) for t in reference.tensors
    ]
    assert set(info.metadata) == {k for k in reference.fields if not k.startswith("GGUF.")}


def test_custom_alignment(tmp_path):
    path = _write_gguf(tmp_path / "aligned.gguf", alignment=64)

    info = read_gguf(path)

    assert info.alignment == 64 and info.metadata["general.alignment"] == 64
    assert info.data_offset % 64 == 0
    assert all(t.offset % 64 == 0 for t in info.tensors)


def test_large_vocabulary_is_summarized(tmp_path):
    path = _write_gguf(tmp_path / "vocab.gguf", n_tokens=50_000)

    info = read_gguf(path)

    assert info.metadata["tokenizer.ggml.tokens"] == GgufArraySummary("STRING", 50_000)


def _tensor(name: str, shape: tuple[int, ...], type_name: str, nbytes: int) -> GgufTensor:
    type_id = next(i for i, (n, _, _) in GGML_TYPES.items() if n == type_name)
    return GgufTensor(name, shape, type_id, type_name, 0, nbytes, int(np.prod(shape)))


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        ([_tensor("norm", (4096,), "F32", 10**6), _tensor("w", (64, 64), "Q8_0", 4352)], "Q8_0"),
        ([_tensor("norm", (64,), "F32", 256)], "F32"),
        ([], ""),
    ],
)
def test_weight_type_name_prefers_matrices(tensors, expected):
    info = GgufInfo(Path("m.gguf"), 3, 0, 32, 0, {}, tensors)

    assert info.weight_type_name == expected


def test_without_architecture_arch_value_is_the_default():
    info = GgufInfo(Path("m.gguf"), 3, 0, 32, 0, {"general.file_type": 15}, [])

    assert info.architecture is None
    assert info.arch_value("context_length", 0) == 0
    assert file_type_name(info.file_type) == "Q4_K_M"


def test_file_type_names():
    assert GGUF_FILE_TYPES[0] == "ALL_F32" and GGUF_FILE_TYPES[1] == "MOSTLY_F16"
    assert file_type_name(32) == "BF16"
    assert file_type_name(999) == "unknown (999)"
    assert file_type_name(None) == "unknown"


def test_ggml_type_table_matches_the_gguf_package():
    # gguf 0.19.0 still lists Q8_1 as 40 bytes; ggml's block_q8_1 is 2 halves + 32 = 36.
    reference = {
        t.value: (t.name, *gguf.constants.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType
    }
    reference[9] = ("Q8_1", 32, 36)

    assert {k: v for k, v in GGML_TYPES.items() if k in reference} == reference


# --- refusals --------------------------------------------------------------------------------


def test_model_file_error_is_a_runtime_error():
    assert issubclass(ModelFileError, EdgeRuntimeError)


CUTS = {
    "fixed header": lambda data, info: 20,
    "metadata key": lambda data, info: _key_pos(data, "general.architecture") - 3,
    "chat template": lambda data, info: _key_pos(data, "tokenizer.chat_template") + 20,
    "token array": lambda data, info: _key_pos(data, "tokenizer.ggml.tokens") + 300,
    "tensor infos": lambda data, info: _tensor_pos(data, "blk.0.attn_k.weight")["dims"] + 3,
    "end of header": lambda data, info: info.data_offset,
    "first tensor data": lambda data, info: info.data_offset + 100,
    "last tensor data": lambda data, info: len(data) - 40,
}


@pytest.mark.parametrize("where", list(CUTS))
def test_refuses_truncated_files(tmp_path, gguf_path, gguf_bytes, where):
    cut = CUTS[where](gguf_bytes, read_gguf(gguf_path))

    message = _refusal_of(tmp_path, gguf_bytes[:cut])

    assert "truncated" in message
    assert "re-download" in message
    if where in ("end of header", "first tensor data"):
        assert "'token_embd.weight' data ends at byte" in message
    if where == "last tensor data":
        assert "'output_norm.weight' data ends at byte" in message


def test_truncated_header_says_where_it_ends(tmp_path, gguf_bytes):
    message = _refusal_of(tmp_path, gguf_bytes[:20])

    assert "truncated: header ends at byte 24 but the file is 20 bytes" in message


@pytest.mark.parametrize("data", [b"G", b"GGUF", b"GGUF\x03\x00\x00\x00\x05"])
def test_refuses_files_smaller_than_the_header(tmp_path, data):
    message = _refusal_of(tmp_path, data)

    assert f"header ends at byte 24 but the file is {len(data)} bytes" in message


def test_refuses_an_empty_file(tmp_path):
    assert "empty" in _refusal_of(tmp_path, b"")


def test_refuses_a_directory(tmp_path):
    assert "is a directory" in _refusal(tmp_path)


def test_refuses_a_missing_file(tmp_path):
    assert "no such file" in _refusal(tmp_path / "absent.gguf")


@pytest.mark.parametrize(
    ("magic", "expected"),
    [
        (b"GGUX", "bad magic b'GGUX'"),
        (b"ggjt", "legacy llama.cpp"),
        (b"tjgg", "convert scripts"),
        (b"PK\x03\x04", "ZIP archive"),
        (b"\x00\x00\x00\x00", "bad magic b'\\x00\\x00\\x00\\x00'"),
    ],
)
def test_refuses_wrong_magic(tmp_path, gguf_bytes, magic, expected):
    message = _refusal_of(tmp_path, magic + gguf_bytes[4:])

    assert "magic" in message and expected in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n", "Git LFS"),
        (struct.pack("<Q", 19) + b'{"__metadata__":{}}', "safetensors"),
        (b"<!DOCTYPE html><html>Not Found</html>", "failed download"),
    ],
)
def test_names_other_formats(tmp_path, data, expected):
    assert expected in _refusal_of(tmp_path, data)


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (struct.pack("<I", 1), "GGUF version 1 is not supported"),
        (struct.pack("<I", 99), "GGUF version 99 is not supported"),
        (struct.pack(">I", 3), "big-endian"),
    ],
)
def test_refuses_unsupported_versions(tmp_path, gguf_bytes, version, expected):
    message = _refusal_of(tmp_path, gguf_bytes[:4] + version + gguf_bytes[8:])

    assert expected in message and "re-convert" in message


@pytest.mark.parametrize(("at", "what"), [(8, "tensors"), (16, "metadata key/value pairs")])
@pytest.mark.parametrize("count", [10**6, 2**40, 2**64 - 1])
def test_refuses_absurd_counts(tmp_path, gguf_bytes, at, what, count):
    message = _refusal_of(tmp_path, _patched(gguf_bytes, at, "<Q", count))

    assert f"claims {count} {what}, which cannot fit" in message


def test_refuses_a_tensor_past_the_end_of_the_file(tmp_path, gguf_bytes):
    at = _tensor_pos(gguf_bytes, "output_norm.weight")["offset"]
    (offset,) = struct.unpack_from("<Q", gguf_bytes, at)

    message = _refusal_of(tmp_path, _patched(gguf_bytes, at, "<Q", offset + 32 * 1024))

    assert "'output_norm.weight' data ends at byte" in message
    assert f"the file is {len(gguf_bytes)} bytes" in message
    assert "truncated or corrupted" in message


def test_refuses_overlapping_tensors(tmp_path, gguf_bytes):
    at = _tensor_pos(gguf_bytes, "blk.0.attn_k.weight")["offset"]

    message = _refusal_of(tmp_path, _patched(gguf_bytes, at, "<Q", 0))

    assert "'blk.0.attn_k.weight' data is at offset 0, expected 6656" in message


def test_refuses_a_misaligned_tensor_offset(tmp_path, gguf_bytes):
    at = _tensor_pos(gguf_bytes, "blk.0.attn_k.weight")["offset"]

    message = _refusal_of(tmp_path, _patched(gguf_bytes, at, "<Q", 6656 + 8))

    assert "'blk.0.attn_k.weight' offset 6664 is not a multiple of 32" in message


@pytest.mark.parametrize("type_id", [4, 200, 2**32 - 1])
def test_refuses_an_unknown_ggml_type(tmp_path, gguf_bytes, type_id):
    at = _tensor_pos(gguf_bytes, "blk.0.attn_q.weight")["type"]

    message = _refusal_of(tmp_path, _patched(gguf_bytes, at, "<I", type_id))

    assert f"'blk.0.attn_q.weight' has unknown ggml type id {type_id}" in message


@pytest.mark.parametrize("n_dims", [0, 5])
def test_refuses_a_bad_number_of_dimensions(tmp_path, gguf_bytes, n_dims):
    at = _tensor_pos(gguf_bytes, "token_embd.weight")["n_dims"]

    message = _refusal_of(tmp_path, _patched(gguf_bytes, at, "<I", n_dims))

    assert f"'token_embd.weight' has {n_dims} dimensions (must be 1-4)" in message


def test_refuses_a_zero_dimension(tmp_path, gguf_bytes):
    at = _tensor_pos(gguf_bytes, "token_embd.weight")["dims"] + 8

    message = _refusal_of(tmp_path, _patched(gguf_bytes, at, "<Q", 0))

    assert "'token_embd.weight' has invalid shape (64, 0)" in message


def test_refuses_rows_that_are_not_whole_blocks(tmp_path, gguf_bytes):
    at = _tensor_pos(gguf_bytes, "blk.0.attn_q.weight")["dims"]

    message = _refusal_of(tmp_path, _patched(gguf_bytes, at, "<Q", 48))

    assert "rows of 48 elements, not a multiple of the block size 32" in message


def test_refuses_duplicate_tensor_names(tmp_path, gguf_bytes):
    start = _tensor_pos(gguf_bytes, "blk.0.attn_k.weight")["start"]
    data = bytearray(gguf_bytes)
    data[start + 8 + len("blk.0.attn_")] = ord("q")

    message = _refusal_of(tmp_path, bytes(data))

    assert "'blk.0.attn_q.weight' appears twice" in message


def test_refuses_duplicate_metadata_keys(tmp_path, gguf_bytes):
    at = _key_pos(gguf_bytes, "tiny.int_b") - 1

    message = _refusal_of(tmp_path, _patched(gguf_bytes, at, "<c", b"a"))

    assert "metadata key 'tiny.int_a' appears twice" in message


@pytest.mark.parametrize("alignment", [0, 48, 2**31 + 1])
def test_refuses_a_bad_alignment(tmp_path, alignment):
    data = _write_gguf(tmp_path / "aligned.gguf", alignment=64).read_bytes()
    at = _key_pos(data, "general.alignment") + 4

    message = _refusal_of(tmp_path, _patched(data, at, "<I", alignment))

    assert f"general.alignment must be a UINT32 power of two, not {alignment}" in message


def test_refuses_an_unknown_value_type(tmp_path, gguf_bytes):
    at = _key_pos(gguf_bytes, "tiny.int_a")

    message = _refusal_of(tmp_path, _patched(gguf_bytes, at, "<I", 13))

    assert "'tiny.int_a' has unknown value type 13" in message


def test_refuses_an_unknown_array_item_type(tmp_path, gguf_bytes):
    at = _key_pos(gguf_bytes, "tiny.scores") + 4

    message = _refusal_of(tmp_path, _patched(gguf_bytes, at, "<I", 77))

    assert "array 'tiny.scores' has unknown item type 77" in message


def test_refuses_an_array_longer_than_the_file(tmp_path, gguf_bytes):
    at = _key_pos(gguf_bytes, "tokenizer.ggml.tokens") + 8

    message = _refusal_of(tmp_path, _patched(gguf_bytes, at, "<Q", 2**40))

    assert f"'tokenizer.ggml.tokens' claims {2**40} STRING items" in message
    assert "truncated or corrupted" in message


def test_refuses_a_string_over_the_limit(tmp_path, gguf_path):
    message = _refusal(gguf_path, max_string_bytes=64)

    assert "value of 'tokenizer.chat_template'" in message
    assert f"is {len(CHAT_TEMPLATE)} bytes long, over the limit of 64 bytes" in message


def test_refuses_a_string_longer_than_the_file(tmp_path, gguf_bytes):
    at = _key_pos(gguf_bytes, "tokenizer.chat_template") + 4

    message = _refusal_of(tmp_path, _patched(gguf_bytes, at, "<Q", len(gguf_bytes)))

    assert f"claims {len(gguf_bytes)} bytes but only" in message
    assert "truncated or corrupted" in message


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (lambda data: _key_pos(data, "tokenizer.chat_template") + 4 + 8, "value of 'tokenizer"),
        (lambda data: _key_pos(data, "tiny.flag") - 4, "metadata key #"),
        (lambda data: _tensor_pos(data, "output_norm.weight")["start"] + 8, "name of tensor #4"),
    ],
)
def test_refuses_invalid_utf8(tmp_path, gguf_bytes, where, expected):
    data = bytearray(gguf_bytes)
    data[where(gguf_bytes)] = 0xFF

    message = _refusal_of(tmp_path, bytes(data))

    assert expected in message and "is not valid UTF-8" in message


def test_refuses_arrays_nested_too_deep(tmp_path):
    key = struct.pack("<Q", 1) + b"x" + struct.pack("<I", 9)
    nested = struct.pack("<IQ", 9, 1) * 20 + struct.pack("<IQ", 0, 0)
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + key + nested

    message = _refusal_of(tmp_path, data)

    assert "nested more than 8 levels deep" in message


def test_a_header_only_file_without_tensors_reads(tmp_path):
    key = struct.pack("<Q", 20) + b"general.architecture" + struct.pack("<I", 8)
    data = b"GGUF" + struct.pack("<IQQ", 2, 0, 1) + key + struct.pack("<Q", 5) + b"llama"
    path = tmp_path / "empty-model.gguf"
    path.write_bytes(data)

    info = read_gguf(path)

    assert (info.version, info.architecture, info.tensors) == (2, "llama", [])
    assert info.n_parameters == 0 and info.weight_type_name == ""


def test_random_header_corruption_raises_only_model_file_error(tmp_path, gguf_path, gguf_bytes):
    header_end = read_gguf(gguf_path).data_offset
    rng = random.Random(1234)
    path = tmp_path / "fuzz.gguf"
    outcomes = {"read": 0, "refused": 0}

    for _ in range(200):
        data = bytearray(gguf_bytes)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(header_end)] = rng.randrange(256)
        path.write_bytes(bytes(data))
        try:
            read_gguf(path)
        except ModelFileError as exc:
            outcomes["refused"] += 1
            assert len(str(exc)) < len(str(path)) + 400  # garbage keys are shortened
        else:
            outcomes["read"] += 1

    assert outcomes["refused"] > 0 and sum(outcomes.values()) == 200
