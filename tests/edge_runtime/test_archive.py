"""Tests for edge_runtime/archive.py: headers anyone can send are refused before the signature.

Each archive is the real CNN bundle's members with one header made to lie. Nothing here is
signed anew: the runtime must refuse these files with a BundleError before it reads the
signature, through ``Runtime.open`` (into a given folder and into its temporary one) and
``extract_bundle(verify_bundle(...))``, writing nothing at all.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from edge_runtime.archive import MAX_EXTENSION_BYTES, NOT_AN_ARCHIVE
from edge_runtime.errors import BundleError
from edge_runtime.manifest import MANIFEST_NAME
from tests.edge_runtime.hostile import (
    MODEL,
    OPENERS,
    end_of_archive,
    raw_member,
    read_files,
    regular,
    tar_bytes,
    tree,
)

HUGE = 1 << 50


def member(name: str, size: int, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def archive_with(
    files: dict[str, bytes], swap: str, info: tarfile.TarInfo, fmt: int = tarfile.GNU_FORMAT
) -> bytes:
    """``files`` archived in order, the member ``swap`` written with the header ``info``
    (its real data behind it, whatever size the header declares)."""
    raw = b""
    for name, data in files.items():
        header = info if name == swap else member(name, len(data))
        raw += raw_member(header, data, fmt)
    return raw + end_of_archive()


def extension_record(kind: bytes, size: int) -> bytes:
    """A pax or GNU long-name record whose header declares ``size`` bytes of data."""
    return raw_member(member("././@LongLink", size, type=kind), b"x" * 100)


@dataclass(frozen=True)
class Hostile:
    build: Callable[[dict[str, bytes]], bytes]
    phrase: str


DECLARES_HUGE = f"declares {HUGE} bytes but only"
SPECIAL_BITS = "(setuid, setgid or sticky bits); bundles hold only plain files, mode 0644"
UNSAFE = "has an unsafe path; the bundle is refused"

HOSTILE = {
    "model-declares-2^50-bytes": Hostile(
        lambda files: archive_with(files, MODEL, member(MODEL, HUGE)),
        f"{NOT_AN_ARCHIVE}: archive member {MODEL!r} {DECLARES_HUGE}",
    ),
    "manifest-declares-2^50-bytes": Hostile(
        lambda files: archive_with(files, MANIFEST_NAME, member(MANIFEST_NAME, HUGE)),
        f"archive member {MANIFEST_NAME!r} {DECLARES_HUGE}",
    ),
    "pax-size-2^50": Hostile(
        lambda files: archive_with(files, MODEL, member(MODEL, HUGE), tarfile.PAX_FORMAT),
        f"archive member {MODEL!r} {DECLARES_HUGE}",
    ),
    "negative-size": Hostile(
        lambda files: archive_with(files, MODEL, member(MODEL, -512)),
        f"archive member {MODEL!r} declares -512 bytes",
    ),
    "pax-record-of-2^50-bytes": Hostile(
        lambda files: extension_record(tarfile.XHDTYPE, HUGE) + tar_bytes([]),
        f"has an extended header of {HUGE} bytes (limit {MAX_EXTENSION_BYTES})",
    ),
    "gnu-long-name-of-2^50-bytes": Hostile(
        lambda files: extension_record(tarfile.GNUTYPE_LONGNAME, HUGE) + tar_bytes([]),
        f"has an extended header of {HUGE} bytes",
    ),
    "gnu-sparse-model": Hostile(
        lambda files: archive_with(
            files, MODEL, member(MODEL, len(files[MODEL]), type=tarfile.GNUTYPE_SPARSE)
        ),
        f"archive member {MODEL!r} is a GNU sparse file; bundles hold only regular files",
    ),
    "pax-sparse-model": Hostile(
        lambda files: archive_with(
            files,
            MODEL,
            member(
                MODEL,
                len(files[MODEL]),
                pax_headers={"GNU.sparse.map": "0,10", "GNU.sparse.size": "10"},
            ),
            tarfile.PAX_FORMAT,
        ),
        f"archive member {MODEL!r} is a GNU sparse file; bundles hold only regular files",
    ),
    "setuid-model": Hostile(
        lambda files: archive_with(files, MODEL, member(MODEL, len(files[MODEL]), mode=0o4755)),
        f"archive member {MODEL!r} has mode 4755 {SPECIAL_BITS}",
    ),
    "setgid-model": Hostile(
        lambda files: archive_with(files, MODEL, member(MODEL, len(files[MODEL]), mode=0o2644)),
        f"archive member {MODEL!r} has mode 2644 {SPECIAL_BITS}",
    ),
    "sticky-model": Hostile(
        lambda files: archive_with(files, MODEL, member(MODEL, len(files[MODEL]), mode=0o1644)),
        f"archive member {MODEL!r} has mode 1644 {SPECIAL_BITS}",
    ),
    "300-character-component": Hostile(
        lambda files: tar_bytes(
            [regular(name, data) for name, data in files.items()]
            + [regular(f"model/{'a' * 300}", b"x")]
        ),
        f"{UNSAFE} (component 'aaaaaaaaaaaaaaaa'... is 300 characters; at most 255",
    ),
    "nul-in-name": Hostile(
        lambda files: tar_bytes(
            [regular(name, data) for name, data in files.items()]
            + [(member("x", 1, pax_headers={"path": "model/a\0b.onnx"}), b"x")]
        ),
        f"'model/a\\x00b.onnx' {UNSAFE} (component 'a\\x00b.onnx' is not allowed",
    ),
    "right-to-left-override-in-name": Hostile(
        lambda files: tar_bytes(
            [regular(name, data) for name, data in files.items()]
            + [regular("model/\u202excod.onnx", b"x")]
        ),
        # repr escapes the override, so the message cannot be reversed on a terminal
        f"{UNSAFE} (component '\\u202excod.onnx' is not allowed",
    ),
}


@pytest.fixture(scope="module")
def bundle_files(cnn_bundle) -> dict[str, bytes]:
    return read_files(cnn_bundle)


@pytest.mark.parametrize("opener", OPENERS.values(), ids=OPENERS.keys())
@pytest.mark.parametrize("hostile", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_lying_header_is_refused_before_anything_is_written(
    hostile, opener, bundle_files, other_keypair, tmp_path
):
    bundle = tmp_path / "hostile.edgepkg"
    bundle.write_bytes(hostile.build(bundle_files))
    target = tmp_path / "target"
    before = tree(tmp_path)

    # The wrong key: each file must be refused before its signature is even read.
    with pytest.raises(BundleError, match=re.escape(hostile.phrase)):
        opener(bundle, other_keypair[1], target)

    assert tree(tmp_path) == before
    assert not os.path.lexists(target)


def test_the_real_bundle_passes_the_screening(cnn_bundle, bundle_files, keypair, tmp_path):
    """The same archive builder, with no header lying, gives a bundle that opens."""
    bundle = tmp_path / "rebuilt.edgepkg"
    raw = b"".join(raw_member(member(n, len(d)), d) for n, d in bundle_files.items())
    bundle.write_bytes(raw + end_of_archive())

    OPENERS["extract-bundle"](bundle, keypair[1], tmp_path / "target")

    assert (tmp_path / "target" / MODEL).read_bytes() == bundle_files[MODEL]
