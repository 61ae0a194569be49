"""``edge-runtime`` on hostile files, end to end: one red line and exit code 1, no traceback.

Each case runs the installed console script in a subprocess, as a user would, and checks
that no extraction folder is left in the temporary folder it was given.
"""

from __future__ import annotations

import tarfile

import numpy as np
import pytest

from tests.edge_runtime.hostile import (
    GIB,
    MODEL,
    TIB,
    VECTORS,
    end_of_archive,
    npy_bytes,
    npz_bytes,
    raw_member,
    read_files,
    saved_npz,
    signed_bundle,
    without_thread_note,
)


@pytest.fixture(scope="module")
def cnn_files(cnn_bundle) -> dict[str, bytes]:
    return read_files(cnn_bundle)


def extraction_folders(tmp_path) -> list:
    """Runtime.open's temporary folders left in the subprocess's TMPDIR (an engine may
    keep a file of its own there)."""
    return list((tmp_path / "tmp").glob("edgepack-*"))


def assert_one_error_line(completed, phrase: str, tmp_path) -> None:
    assert completed.returncode == 1, completed.stderr
    assert completed.stdout == ""
    lines = without_thread_note(completed.stderr).splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("error: ")
    assert phrase in lines[0]
    assert extraction_folders(tmp_path) == []


@pytest.mark.parametrize("command", ["selftest", "info", "run"])
def test_a_member_declaring_2_to_the_50_bytes_is_one_line(
    command, edge_runtime, cnn_files, keypair, tmp_path
):
    bundle = tmp_path / "oversized.edgepkg"
    raw = b""
    for name, data in cnn_files.items():
        info = tarfile.TarInfo(name)
        info.size = 1 << 50 if name == MODEL else len(data)
        raw += raw_member(info, data)
    bundle.write_bytes(raw + end_of_archive())
    (tmp_path / "in.npz").write_bytes(saved_npz(image=np.zeros((1, 1, 8, 8), np.float32)))
    args = ["--input", tmp_path / "in.npz", "--output", tmp_path / "o.npz"]

    completed = edge_runtime(
        command, bundle, "--pubkey", keypair[1], *(args if command == "run" else [])
    )

    assert_one_error_line(
        completed, f"archive member {MODEL!r} declares {1 << 50} bytes but only", tmp_path
    )


@pytest.mark.parametrize(
    ("claimed", "phrase"),
    [
        pytest.param(TIB, f"declares float32[{TIB // 4}], 1.0 TiB, but the file holds 16 bytes"),
        pytest.param(GIB, f"declares float32[{GIB // 4}], 1.0 GiB, but the file holds 16 bytes"),
    ],
    ids=["1-TiB", "1-GiB"],
)
def test_run_refuses_an_input_whose_header_claims_too_much_in_one_line(
    claimed, phrase, edge_runtime, cnn_bundle, keypair, tmp_path
):
    input_path = tmp_path / "in.npz"
    input_path.write_bytes(npz_bytes({"image.npy": npy_bytes("<f4", (claimed // 4,), bytes(16))}))
    output = tmp_path / "out.npz"

    completed = edge_runtime(
        "run", cnn_bundle, "--pubkey", keypair[1], "--input", input_path, "--output", output
    )

    assert_one_error_line(completed, f"error: input file {input_path}: array 'image' ", tmp_path)
    assert phrase in completed.stderr
    assert "pickle" not in completed.stderr
    assert not output.exists()


def test_selftest_with_vectors_claiming_512_gib_is_one_line(
    edge_runtime, cnn_files, keypair, tmp_path
):
    vectors = npz_bytes({"input.image.npy": npy_bytes("<f4", (1 << 37,), bytes(64))})
    bundle = signed_bundle(cnn_files, keypair[0], tmp_path / "b.pkg", replace={VECTORS: vectors})

    completed = edge_runtime("selftest", bundle, "--pubkey", keypair[1])

    assert_one_error_line(
        completed,
        "the bundle's self-test vectors vectors.npz: array 'input.image' declares "
        f"float32[{1 << 37}], 512.0 GiB",
        tmp_path,
    )


def test_selftest_with_a_float1024_input_is_one_line(edge_runtime, cnn_files, keypair, tmp_path):
    bundle = signed_bundle(
        cnn_files,
        keypair[0],
        tmp_path / "b.edgepkg",
        edit=lambda manifest: manifest["inputs"][0].update(dtype="float1024"),
    )

    completed = edge_runtime("selftest", bundle, "--pubkey", keypair[1])

    assert_one_error_line(
        completed, "input 'image': dtype 'float1024' is not a tensor dtype", tmp_path
    )


def test_selftest_with_no_reference_outputs_fails(edge_runtime, cnn_files, keypair, tmp_path):
    vectors = saved_npz(**{"input.image": np.zeros((8, 1, 8, 8), np.float32)})
    bundle = signed_bundle(cnn_files, keypair[0], tmp_path / "b.pkg", replace={VECTORS: vectors})

    completed = edge_runtime("selftest", bundle, "--pubkey", keypair[1])

    assert completed.returncode == 1
    lines = completed.stdout.splitlines()
    assert lines[0].startswith("self-test FAIL: 0 vectors")
    assert lines[1] == (
        f"  {VECTORS} holds no reference outputs (reference.NAME), so nothing would be "
        "compared; the bundle was built wrong, rebuild it"
    )
    assert without_thread_note(completed.stderr) == ""
    assert extraction_folders(tmp_path) == []
