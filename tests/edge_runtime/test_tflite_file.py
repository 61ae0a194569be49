"""edge_runtime.tflite_file on the real digits CNN converted by litert-torch.

Every refusal starts from the real file and damages it the way a cut-off copy, a wrong
file or a flipped bit would. The walk must refuse before any interpreter loads the file:
tflite_runtime crashes the process on such files.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from edge_runtime.errors import ModelFileError
from edge_runtime.tflite_file import IDENTIFIER, check_tflite, describe_magic


@pytest.fixture(scope="module")
def model_bytes(digits_tflite_example) -> bytes:
    return digits_tflite_example.model.read_bytes()


def _write(tmp_path: Path, data: bytes, name: str = "model.tflite") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_facts_of_the_real_model(digits_tflite_example, model_bytes):
    facts = check_tflite(digits_tflite_example.model)
    assert facts.version == 3
    assert facts.subgraphs == 1
    assert facts.signatures == ["serving_default"]
    # 3 convolutions and 2 dense layers, each with a float32 weight and bias tensor
    assert facts.weight_types.get("float32", 0) >= 10
    assert not facts.quantized
    assert facts.operators >= 8
    # the CNN's parameters (about 39k floats) are most of the file
    assert 0.8 * len(model_bytes) < facts.weight_bytes <= len(model_bytes)


@pytest.mark.parametrize("keep", [0, 3, 7])
def test_too_short_files_are_refused(tmp_path, model_bytes, keep):
    with pytest.raises(ModelFileError, match="too short|truncated"):
        check_tflite(_write(tmp_path, model_bytes[:keep]))


def test_every_truncation_is_refused(tmp_path, digits_tflite_example, model_bytes):
    """Cut points all over the file: the weights sit at its end, the tables at its start.

    Only alignment padding may follow the last byte the model uses.
    """
    extent = check_tflite(digits_tflite_example.model).extent
    assert len(model_bytes) - 16 <= extent <= len(model_bytes)
    rng = random.Random(0)
    cuts = {8, 16, 64, 256, extent - 1, extent - 16}
    cuts |= set(rng.sample(range(9, extent - 1), 60))
    for cut in sorted(cuts):
        with pytest.raises(ModelFileError, match="not a valid TFLite model"):
            check_tflite(_write(tmp_path, model_bytes[:cut]))


@pytest.mark.parametrize(
    "head, looks_like",
    [
        (b"GGUF\x03\x00\x00\x00", "GGUF"),
        (b"PK\x03\x04\x14\x00\x00\x00", "zip archive"),
        (b"\x80\x04\x95\x00\x00\x00\x00\x00", "pickle"),
        (b"\x08\x07\x12\x07pytorch", "ONNX"),
        (b"\x89HDF\r\n\x1a\n", "HDF5"),
        (b"hello, world", "unknown format"),
    ],
)
def test_other_formats_are_named(tmp_path, head, looks_like):
    with pytest.raises(ModelFileError, match=f"no 'TFL3' identifier.*{looks_like}"):
        check_tflite(_write(tmp_path, head + bytes(64)))


def test_describe_magic_defaults():
    assert describe_magic(b"") == "an unknown format"


def test_root_offset_past_the_end(tmp_path, model_bytes):
    damaged = struct.pack("<I", len(model_bytes) + 100) + model_bytes[4:]
    with pytest.raises(ModelFileError, match="outside the .*-byte file"):
        check_tflite(_write(tmp_path, damaged))


def test_wrong_schema_version(tmp_path, digits_tflite_example, model_bytes):
    # The version field is the first scalar the model table holds; find it by value.
    root = struct.unpack_from("<I", model_bytes, 0)[0]
    vtable = root - struct.unpack_from("<i", model_bytes, root)[0]
    version_at = root + struct.unpack_from("<H", model_bytes, vtable + 4)[0]
    assert struct.unpack_from("<I", model_bytes, version_at)[0] == 3
    damaged = bytearray(model_bytes)
    struct.pack_into("<I", damaged, version_at, 7)
    with pytest.raises(ModelFileError, match="schema version 7"):
        check_tflite(_write(tmp_path, bytes(damaged)))


def test_huge_vector_length_is_refused(tmp_path, model_bytes):
    """A flipped high bit in the buffers vector length must not make the walk read 4 GB."""
    root = struct.unpack_from("<I", model_bytes, 0)[0]
    vtable = root - struct.unpack_from("<i", model_bytes, root)[0]
    field_at = root + struct.unpack_from("<H", model_bytes, vtable + 4 + 2 * 4)[0]  # buffers
    vector_at = field_at + struct.unpack_from("<I", model_bytes, field_at)[0]
    damaged = bytearray(model_bytes)
    struct.pack_into("<I", damaged, vector_at, 0x7FFFFFFF)
    with pytest.raises(ModelFileError, match="buffers .* runs past the end"):
        check_tflite(_write(tmp_path, bytes(damaged)))


def test_identifier_constant():
    assert IDENTIFIER == b"TFL3"


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="cannot read model file"):
        check_tflite(tmp_path / "absent.tflite")
