"""Tests for packager/data.py: hostile --eval and --calibration files are one error line.

The files are read by the device's own reader (``edge_runtime.npz_file``), which checks each
``.npy`` header against the bytes the file holds before allocating: a header claiming 1 TiB
was a ``MemoryError`` traceback out of ``np.load`` on the build host (issue 13).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from packager.data import read_npz
from packager.errors import DataError
from tests.edge_runtime.hostile import TIB, npy_bytes, npz_bytes, saved_npz

IMAGE = np.zeros((2, 1, 8, 8), np.float32)
RESAVE = "takes an .npz written by np.savez: one array per model input, samples first"
PROGRESS = re.compile(r"^ *\d+\.\ds  \S")  # "   0.0s  validate: ..."
RAGGED = "holds an object array: samples of different shapes, or other Python objects"

HOSTILE = {
    "header-claims-1-TiB": (
        npz_bytes({"image.npy": npy_bytes("<f4", (TIB // 4,), bytes(16))}),
        f"array 'image' declares float32[{TIB // 4}], 1.0 TiB, but the file holds 16 bytes "
        f"of it; the file is truncated or was crafted (--eval {RESAVE})",
    ),
    "pickled-object-array": (
        saved_npz(image=np.array([{"payload": 1}], dtype=object)),
        f"{RAGGED}. Each array must be rectangular",
    ),
    "truncated": (
        saved_npz(image=IMAGE)[:300],
        "is not a readable .npz of plain arrays",
    ),
}


@pytest.mark.parametrize(("content", "phrase"), HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_file_is_a_data_error_naming_the_file(content, phrase, tmp_path):
    path = tmp_path / "eval.npz"
    path.write_bytes(content)

    with pytest.raises(DataError, match=re.escape(phrase)) as caught:
        read_npz(path, "eval")

    message = str(caught.value)
    assert message.startswith(f"eval file {path}")
    assert "\n" not in message


def test_a_truncated_file_says_how_to_fix_it(tmp_path):
    path = tmp_path / "calib.npz"
    path.write_bytes(saved_npz(image=IMAGE)[:300])

    with pytest.raises(DataError) as caught:
        read_npz(path, "calibration")

    assert str(caught.value).endswith(f"(--calibration {RESAVE})")


def test_a_ragged_file_is_not_called_a_pickle(tmp_path):
    path = tmp_path / "eval.npz"
    images = np.empty(2, dtype=object)
    images[0], images[1] = np.zeros((6, 4), np.float32), np.zeros((5, 4), np.float32)
    np.savez(path, image=images)

    with pytest.raises(DataError, match=re.escape(RAGGED)) as caught:
        read_npz(path, "eval")

    assert "give --eval once per file" in str(caught.value)
    assert "pickle" not in str(caught.value)


def test_a_good_file_reads_as_np_load_does(tmp_path):
    path = tmp_path / "eval.npz"
    labels = np.arange(2)
    np.savez_compressed(path, image=IMAGE + 1, labels=labels)

    arrays = read_npz(path, "eval")

    assert set(arrays) == {"image", "labels"}
    np.testing.assert_array_equal(arrays["image"], IMAGE + 1)
    np.testing.assert_array_equal(arrays["labels"], labels)


# --- end to end: the real console script ---------------------------------------------------


@pytest.mark.parametrize(("content", "phrase"), HOSTILE.values(), ids=HOSTILE.keys())
def test_edgepack_build_with_a_hostile_eval_file_is_one_line(
    content, phrase, digits_example, keypair, tmp_path
):
    hostile = tmp_path / "eval.npz"
    hostile.write_bytes(content)
    output = tmp_path / "out" / "digits.edgepkg"
    temp = tmp_path / "build-tmp"
    temp.mkdir()
    args = ["build", str(digits_example.model), "--profile", "x86-64-avx2"]
    args += ["--key", str(keypair[0]), "-o", str(output), "--eval", str(hostile)]

    completed = subprocess.run(
        [sys.executable, "-c", "from packager.cli import main; main()", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TMPDIR": str(temp)},
    )

    assert completed.returncode == 1, completed.stderr
    assert completed.stdout == ""
    # the steps done before the data are read print their progress lines first
    errors = [line for line in completed.stderr.splitlines() if not PROGRESS.match(line)]
    assert len(errors) == 1, completed.stderr
    assert errors[0].startswith(f"error: eval file {hostile}")
    assert phrase in errors[0]
    assert "Traceback" not in completed.stderr
    assert not output.exists() and not output.parent.exists()
    assert list(temp.iterdir()) == []  # no build folder left behind
