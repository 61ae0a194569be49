"""Tests for edge_runtime/npz_file.py: headers are checked before a byte is allocated."""

from __future__ import annotations

import io
import re
import struct
import warnings
import zipfile

import numpy as np
import pytest

from edge_runtime.errors import InputSignatureError
from edge_runtime.npz_file import human_bytes, read_npz
from tests.edge_runtime.hostile import GIB, TIB, npy_bytes, npz_bytes, saved_npz

IMAGE = np.arange(2 * 1 * 8 * 8, dtype=np.float32).reshape(2, 1, 8, 8)
TRUNCATED = "the file is truncated or was crafted"


def claiming(claimed: int, size: int | None = None) -> bytes:
    """An npz whose one member's header declares ``claimed`` bytes of float32 but whose
    zip entry holds 16; with ``size``, the zip directory claims ``size`` bytes too."""
    raw = npz_bytes({"image.npy": npy_bytes("<f4", (claimed // 4,), bytes(16))})
    return raw if size is None else with_declared_size(raw, size)


def with_declared_size(raw: bytes, size: int) -> bytes:
    """``raw`` (a one-member zip) with the member's uncompressed size set to ``size`` in
    both its local header and the central directory, as a crafted file may say."""
    data = bytearray(raw)
    local = data.index(b"PK\x03\x04")
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, size)
    struct.pack_into("<I", data, central + 24, size)
    return bytes(data)


def version_3(array: np.ndarray) -> bytes:
    """``array`` as .npy format 3.0 (UTF-8 header), which numpy writes only for odd dtypes."""
    header = repr({"descr": "<f4", "fortran_order": False, "shape": array.shape}).encode()
    header += b" " * (-(len(header) + 13) % 64) + b"\n"
    return b"\x93NUMPY\x03\x00" + struct.pack("<I", len(header)) + header + array.tobytes()


def member_twice() -> bytes:
    """An npz holding ``image.npy`` twice (np.load would take the last one)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name
        for _ in range(2):
            archive.writestr("image.npy", npy_bytes("<f4", (1,), bytes(4)))
    return buffer.getvalue()


HOSTILE = {
    "header-claims-1-TiB": (
        claiming(TIB),
        f"array 'image' declares float32[{TIB // 4}], 1.0 TiB, but the file holds 16 bytes "
        f"of it; {TRUNCATED}",
    ),
    "header-claims-1-GiB": (
        claiming(GIB),
        f"array 'image' declares float32[{GIB // 4}], 1.0 GiB, but the file holds 16 bytes",
    ),
    "header-claims-512-GiB-in-2-d": (
        npz_bytes({"x.npy": npy_bytes("<f8", (1 << 16, 1 << 20), bytes(8))}),
        "array 'x' declares float64[65536, 1048576], 512.0 GiB, but the file holds 8 bytes",
    ),
    "zip-directory-claims-more-than-stored": (
        claiming(1 << 31, size=(1 << 31) + 128),
        "claims 2147483776 bytes from 144 compressed ones, more than storing can give",
    ),
    "pickled-object-array": (
        saved_npz(image=np.array([{"payload": 1}], dtype=object)),
        "array 'image' holds Python objects: pickled arrays are refused",
    ),
    "truncated-central-directory": (saved_npz(image=IMAGE)[:-30], "is not a readable .npz"),
    "truncated-in-data": (saved_npz(image=IMAGE)[:300], "is not a readable .npz"),
    "not-an-npy-member": (
        npz_bytes({"notes.txt": b"hello"}),
        "member 'notes.txt' is not an .npy array",
    ),
    "member-twice": (
        member_twice(),
        "members ['image.npy'] appear twice; the file was crafted",
    ),
    "dtype-float1024": (
        npz_bytes({"image.npy": npy_bytes("<f4", (4,), bytes(16)).replace(b"<f4", b"f1024")}),
        "is not a readable .npz of plain arrays",
    ),
    "npy-format-3": (
        npz_bytes({"image.npy": version_3(np.zeros(4, np.float32))}),
        "image.npy is .npy format (3, 0), which is not read",
    ),
    "a-plain-npy-file": (npy_bytes("<f4", (4,), bytes(16)), "holds a single array, not an .npz"),
    "garbage": (b"definitely not numpy", "is not a readable .npz of plain arrays"),
    "empty-file": (b"", "is not a readable .npz of plain arrays"),
}


@pytest.mark.parametrize(("content", "phrase"), HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_file_is_refused_with_what_is_wrong(content, phrase, tmp_path):
    path = tmp_path / "in.npz"
    path.write_bytes(content)

    with pytest.raises(InputSignatureError, match=re.escape(phrase)) as caught:
        read_npz(path, InputSignatureError, label="input file in.npz")

    assert str(caught.value).startswith("input file in.npz")


def test_the_1_gib_claim_is_not_called_a_pickle(tmp_path):
    path = tmp_path / "in.npz"
    path.write_bytes(claiming(GIB))

    with pytest.raises(InputSignatureError) as caught:
        read_npz(path, InputSignatureError)

    assert "pickle" not in str(caught.value)


def test_arrays_beyond_the_budget_are_refused_before_they_are_read(tmp_path):
    path = tmp_path / "in.npz"
    path.write_bytes(saved_npz(image=IMAGE, other=IMAGE))

    with pytest.raises(InputSignatureError, match=r"the arrays need 1\.0 KiB, more than the 1000"):
        read_npz(path, InputSignatureError, budget=1000)


def test_a_missing_file_is_named(tmp_path):
    missing = tmp_path / "missing.npz"

    with pytest.raises(InputSignatureError, match=re.escape(f"{missing} does not exist")):
        read_npz(missing, InputSignatureError)


class ObjectsRefused(InputSignatureError):
    """A caller's own class for object arrays (the packager speaks of ragged samples)."""


def test_an_object_array_raises_the_callers_objects_error(tmp_path):
    path = tmp_path / "in.npz"
    path.write_bytes(saved_npz(image=np.array([{"payload": 1}], dtype=object)))

    with pytest.raises(ObjectsRefused, match="array 'image' holds Python objects"):
        read_npz(path, InputSignatureError, objects_error=ObjectsRefused)


def test_other_refusals_keep_the_error_class_when_an_objects_error_is_given(tmp_path):
    path = tmp_path / "in.npz"
    path.write_bytes(claiming(TIB))

    with pytest.raises(InputSignatureError) as caught:
        read_npz(path, InputSignatureError, objects_error=ObjectsRefused)

    assert type(caught.value) is InputSignatureError


ARRAYS = {
    "image": IMAGE,
    "flags": np.array([True, False]),
    "scalar": np.array(3.5),
    "empty": np.zeros((0, 4), np.int64),
    "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
    "big-endian": np.arange(3, dtype=">i4"),
}


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_what_numpy_writes_reads_back_unchanged(save, tmp_path):
    path = tmp_path / "in.npz"
    save(path, **ARRAYS)

    arrays = read_npz(path, InputSignatureError)

    assert set(arrays) == set(ARRAYS)
    for name, expected in ARRAYS.items():
        assert arrays[name].dtype == expected.dtype
        np.testing.assert_array_equal(arrays[name], expected)


def test_a_highly_compressed_real_array_is_read(tmp_path):
    """32 MiB of zeros deflate about 1000:1, close to deflate's limit, and are genuine."""
    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, zeros=np.zeros(1 << 23, np.float32))

    arrays = read_npz(path, InputSignatureError)

    assert arrays["zeros"].shape == (1 << 23,)
    assert path.stat().st_size < (1 << 23) * 4 / 500


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 bytes"), (1023, "1023 bytes"), (1024, "1.0 KiB"), (GIB, "1.0 GiB"), (TIB, "1.0 TiB")],
)
def test_human_bytes(count, text):
    assert human_bytes(count) == text
