"""Tests for packager/inspect.py: ``edgepack inspect`` screens headers as the device does."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile

import pytest

from edge_runtime.errors import BundleError
from packager.inspect import read_manifest_bytes_unverified
from tests.edge_runtime.hostile import (
    MODEL,
    end_of_archive,
    raw_member,
    read_files,
    regular,
    tar_bytes,
)


@pytest.fixture(scope="module")
def bundle_files(cnn_bundle) -> dict[str, bytes]:
    return read_files(cnn_bundle)


def with_header(files: dict[str, bytes], name: str, **fields) -> bytes:
    raw = b""
    for member, data in files.items():
        info = tarfile.TarInfo(member)
        info.size, info.mode = len(data), 0o644
        if member == name:
            for key, value in fields.items():
                setattr(info, key, value)
        raw += raw_member(info, data)
    return raw + end_of_archive()


@pytest.mark.parametrize(
    ("build", "phrase"),
    [
        pytest.param(
            lambda files: with_header(files, MODEL, size=1 << 50),
            f"archive member {MODEL!r} declares {1 << 50} bytes but only",
            id="member-declares-2^50-bytes",
        ),
        pytest.param(
            lambda files: with_header(files, MODEL, type=tarfile.GNUTYPE_SPARSE),
            f"archive member {MODEL!r} is a GNU sparse file",
            id="gnu-sparse",
        ),
        pytest.param(
            lambda files: with_header(files, "manifest.json", mode=0o4644),
            "archive member 'manifest.json' has mode 4644 (setuid, setgid or sticky bits)",
            id="setuid-manifest",
        ),
        pytest.param(
            lambda files: tar_bytes([regular(MODEL, files[MODEL])]),
            "has no manifest.json; it is not an edgepack bundle",
            id="no-manifest",
        ),
    ],
)
def test_a_crafted_archive_is_a_bundle_error(build, phrase, bundle_files, tmp_path):
    bundle = tmp_path / "crafted.edgepkg"
    bundle.write_bytes(build(bundle_files))

    with pytest.raises(BundleError, match=re.escape(phrase)):
        read_manifest_bytes_unverified(bundle)


def test_edgepack_inspect_prints_one_line_for_a_member_declaring_2_to_the_50_bytes(
    bundle_files, tmp_path
):
    bundle = tmp_path / "crafted.edgepkg"
    bundle.write_bytes(with_header(bundle_files, MODEL, size=1 << 50))

    completed = subprocess.run(
        [sys.executable, "-c", "from packager.cli import main; main()", "inspect", str(bundle)],
        capture_output=True,
        text=True,
        check=False,
    )

    assert completed.returncode == 1
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("error: ")
    assert f"declares {1 << 50} bytes" in lines[0]


def test_the_real_bundle_is_read(cnn_bundle, bundle_files):
    assert read_manifest_bytes_unverified(cnn_bundle) == bundle_files["manifest.json"]
