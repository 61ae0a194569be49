"""Tests for edge_runtime/bundle.py: verify everything first, then extract only what is listed.

Every tampered archive is built with ``tarfile`` from the members of the real CNN bundle.
Each refusal is checked three ways (``Runtime.open`` into a given folder, ``Runtime.open``
into its temporary folder, and ``extract_bundle(verify_bundle(...))``), and each time the
test also checks that nothing at all was written: not the target, not the temporary
folder, and not the "evil" path the archive aims at.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_runtime.bundle import extract_bundle, verify_bundle
from edge_runtime.errors import BundleError, SignatureError
from edge_runtime.manifest import MANIFEST_NAME, SIGNATURE_NAME
from edge_runtime.signing import key_id, load_public_key
from tests.edge_runtime.hostile import (
    MODEL,
    VECTORS,
    Member,
    files_under,
    open_runtime_into_target,
    open_runtime_into_temp,
    read_files,
    regular,
    tar_bytes,
    tree,
    tree_outside,
    verify_then_extract,
)

# --- building archives ------------------------------------------------------------------


def link(name: str, target: str, kind: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, b""


def directory(name: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info, b""


def rebuild(
    files: dict[str, bytes],
    *,
    replace: dict[str, Member] | None = None,
    drop: tuple[str, ...] = (),
    extra: tuple[Member, ...] = (),
) -> bytes:
    """Re-archive ``files``, swapping, dropping or adding members."""
    replace = replace or {}
    members = [replace.get(name) or regular(name, data) for name, data in files.items()]
    members = [(info, data) for info, data in members if info.name not in drop]
    return tar_bytes(members + list(extra))


def flip(data: bytes) -> bytes:
    """Flip every bit of the middle byte."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


def cut_inside(raw: bytes, name: str) -> bytes:
    """The archive truncated 100 bytes into the data of member ``name``."""
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as archive:
        return raw[: archive.getmember(name).offset_data + 100]


# --- the tampering matrix ---------------------------------------------------------------

Build = Callable[[dict[str, bytes], bytes, Path], bytes]


@dataclass(frozen=True)
class Tamper:
    """How to make a bad archive (from the real members, raw bytes and the evil path)."""

    build: Build
    error: type[Exception]
    phrase: str
    wrong_key: bool = False


NOT_AN_ARCHIVE = "is not a readable .edgepkg archive"
UNSAFE = "has an unsafe path; the bundle is refused"

TAMPERS = [
    pytest.param(
        Tamper(
            lambda files, raw, evil: rebuild(
                files, replace={MODEL: regular(MODEL, flip(files[MODEL]))}
            ),
            BundleError,
            f"{MODEL!r} does not match its sha256 in the manifest",
        ),
        id="flipped-model-byte",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: rebuild(
                files, replace={MANIFEST_NAME: regular(MANIFEST_NAME, flip(files[MANIFEST_NAME]))}
            ),
            SignatureError,
            "bundle signature does not verify",
        ),
        id="flipped-manifest-byte",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: rebuild(
                files,
                replace={SIGNATURE_NAME: regular(SIGNATURE_NAME, flip(files[SIGNATURE_NAME]))},
            ),
            SignatureError,
            "bundle signature does not verify",
        ),
        id="flipped-signature-byte",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: raw,
            SignatureError,
            "the bundle was modified or signed with a different key",
            wrong_key=True,
        ),
        id="wrong-key",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: rebuild(
                files, extra=(regular("model/extra.bin", b"payload"),)
            ),
            BundleError,
            "archive holds members the manifest does not list: ['model/extra.bin']",
        ),
        id="extra-member",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: rebuild(files, extra=(regular("../evil", b"payload"),)),
            BundleError,
            f"'../evil' {UNSAFE}",
        ),
        id="dotdot-member",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: rebuild(files, extra=(regular("model/../../evil", b"x"),)),
            BundleError,
            UNSAFE,
        ),
        id="nested-dotdot-member",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: rebuild(files, extra=(regular(str(evil), b"payload"),)),
            BundleError,
            UNSAFE,
        ),
        id="absolute-member",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: rebuild(
                files, extra=(regular("model\\..\\..\\evil", b"payload"),)
            ),
            BundleError,
            UNSAFE,
        ),
        id="backslash-member",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: rebuild(
                files, replace={MODEL: link(MODEL, str(evil), tarfile.SYMTYPE)}
            ),
            BundleError,
            f"{MODEL!r} is a symlink; bundles hold only regular files",
        ),
        id="symlink-member",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: rebuild(
                files, extra=(link("model", str(evil), tarfile.SYMTYPE),)
            ),
            BundleError,
            "'model' is a symlink",
        ),
        id="symlink-folder-member",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: rebuild(
                files, replace={MODEL: link(MODEL, "../evil", tarfile.LNKTYPE)}
            ),
            BundleError,
            f"{MODEL!r} is a hard link; bundles hold only regular files",
        ),
        id="hardlink-member",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: rebuild(files, extra=(directory("model"),)),
            BundleError,
            "'model' is a non-file",
        ),
        id="directory-member",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: rebuild(files, extra=(regular(MODEL, flip(files[MODEL])),)),
            BundleError,
            f"{MODEL!r} appears twice",
        ),
        id="duplicate-model",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: rebuild(files, extra=(regular(MANIFEST_NAME, b"{}"),)),
            BundleError,
            f"{MANIFEST_NAME!r} appears twice",
        ),
        id="duplicate-manifest",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: rebuild(
                files, replace={MODEL: regular(MODEL, files[MODEL] + b"\0")}
            ),
            BundleError,
            "bytes but the manifest declares",
        ),
        id="size-differs",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: rebuild(files, drop=(VECTORS,)),
            BundleError,
            f"manifest lists {VECTORS!r} but the archive lacks it",
        ),
        id="missing-member",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: rebuild(files, drop=(SIGNATURE_NAME,)),
            BundleError,
            f"has no {SIGNATURE_NAME}",
        ),
        id="missing-signature",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: rebuild(files, drop=(MANIFEST_NAME,)),
            BundleError,
            f"has no {MANIFEST_NAME}",
        ),
        id="missing-manifest",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: rebuild(
                files, replace={SIGNATURE_NAME: regular(SIGNATURE_NAME, bytes(2048))}
            ),
            BundleError,
            "is 2048 bytes; limit 1024",
        ),
        id="oversized-signature",
    ),
    pytest.param(
        Tamper(lambda files, raw, evil: raw[:100], BundleError, NOT_AN_ARCHIVE),
        id="truncated-in-first-header",
    ),
    pytest.param(
        Tamper(
            lambda files, raw, evil: cut_inside(raw, MANIFEST_NAME), BundleError, NOT_AN_ARCHIVE
        ),
        id="truncated-in-manifest",
    ),
    pytest.param(
        Tamper(lambda files, raw, evil: cut_inside(raw, MODEL), BundleError, NOT_AN_ARCHIVE),
        id="truncated-in-model",
    ),
    pytest.param(
        Tamper(lambda files, raw, evil: cut_inside(raw, VECTORS), BundleError, NOT_AN_ARCHIVE),
        id="truncated-in-last-member",
    ),
    pytest.param(
        Tamper(lambda files, raw, evil: b"", BundleError, NOT_AN_ARCHIVE),
        id="empty-file",
    ),
    pytest.param(
        Tamper(lambda files, raw, evil: b"not an edgepkg at all\n", BundleError, NOT_AN_ARCHIVE),
        id="text-file",
    ),
    pytest.param(
        Tamper(lambda files, raw, evil: files[VECTORS], BundleError, NOT_AN_ARCHIVE),
        id="zip-file",
    ),
    pytest.param(
        Tamper(lambda files, raw, evil: gzip.compress(raw), BundleError, NOT_AN_ARCHIVE),
        id="gzipped-bundle",
    ),
]


OPENERS = [
    pytest.param(open_runtime_into_target, id="runtime-extract-dir"),
    pytest.param(open_runtime_into_temp, id="runtime-temp-dir"),
    pytest.param(verify_then_extract, id="extract-bundle"),
]


@pytest.fixture(scope="module")
def bundle_files(cnn_bundle) -> dict[str, bytes]:
    return read_files(cnn_bundle)


# --- tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("opener", OPENERS)
@pytest.mark.parametrize("tamper", TAMPERS)
def test_tampered_bundle_is_refused_and_nothing_is_written(
    tamper, opener, cnn_bundle, bundle_files, keypair, other_keypair, tmp_path
):
    bundle = tmp_path / "tampered.edgepkg"
    evil = tmp_path / "evil"
    bundle.write_bytes(tamper.build(bundle_files, cnn_bundle.read_bytes(), evil))
    pubkey = other_keypair[1] if tamper.wrong_key else keypair[1]
    target = tmp_path / "target"
    before = tree(tmp_path)

    with pytest.raises(tamper.error, match=re.escape(tamper.phrase)):
        opener(bundle, pubkey, target)

    assert tree(tmp_path) == before
    assert not target.exists()
    assert not os.path.lexists(evil)


def test_verify_bundle_returns_manifest_and_signer(cnn_bundle, bundle_files, keypair, tmp_path):
    before = tree(tmp_path)

    verified = verify_bundle(cnn_bundle, keypair[1])

    assert verified.path == cnn_bundle
    assert verified.manifest_bytes == bundle_files[MANIFEST_NAME]
    assert verified.key_id == key_id(load_public_key(keypair[1]))
    assert {entry.path for entry in verified.manifest.files} == {MODEL, VECTORS}
    assert tree(tmp_path) == before


def test_verify_bundle_refuses_a_missing_file(keypair, tmp_path):
    missing = tmp_path / "nowhere.edgepkg"

    with pytest.raises(BundleError, match="does not exist"):
        verify_bundle(missing, keypair[1])


def test_extract_bundle_writes_exactly_the_listed_files(
    cnn_bundle, bundle_files, keypair, tmp_path
):
    verified = verify_bundle(cnn_bundle, keypair[1])
    target = tmp_path / "not" / "yet" / "there"

    root = extract_bundle(verified, target)

    assert root == target.resolve()
    assert files_under(root) == {MODEL, VECTORS, MANIFEST_NAME}
    for entry in verified.manifest.files:
        data = (root / entry.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry.sha256
        assert data == bundle_files[entry.path]
    assert (root / MANIFEST_NAME).read_bytes() == verified.manifest_bytes
    assert not (root / SIGNATURE_NAME).exists()


@pytest.mark.parametrize("existing", [MODEL, VECTORS, MANIFEST_NAME])
@pytest.mark.parametrize(
    "opener",
    [
        pytest.param(open_runtime_into_target, id="runtime"),
        pytest.param(verify_then_extract, id="extract-bundle"),
    ],
)
def test_extract_refuses_to_overwrite_an_existing_file(
    existing, opener, cnn_bundle, keypair, tmp_path
):
    target = tmp_path / "target"
    (target / existing).parent.mkdir(parents=True, exist_ok=True)
    (target / existing).write_bytes(b"mine, do not touch")
    outside = tree_outside(tmp_path, "target")

    with pytest.raises(BundleError, match="already exists; extract into an empty folder"):
        opener(cnn_bundle, keypair[1], target)

    assert (target / existing).read_bytes() == b"mine, do not touch"
    assert files_under(target) == {existing}
    assert tree_outside(tmp_path, "target") == outside


@pytest.mark.parametrize(
    ("planted", "points_to", "phrase"),
    [
        pytest.param("model", "outside", "would land outside", id="folder-symlink"),
        pytest.param(MODEL, "outside/model.onnx", "would land outside", id="model-symlink"),
        pytest.param(
            MANIFEST_NAME, "outside/manifest.json", "already exists", id="manifest-symlink"
        ),
    ],
)
def test_extract_never_follows_a_symlink_planted_in_the_target(
    planted, points_to, phrase, cnn_bundle, keypair, tmp_path
):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    (target / planted).parent.mkdir(parents=True, exist_ok=True)
    (target / planted).symlink_to(tmp_path / points_to)
    verified = verify_bundle(cnn_bundle, keypair[1])

    with pytest.raises(BundleError, match=phrase):
        extract_bundle(verified, target)

    assert list(outside.iterdir()) == []
    assert files_under(target) == {planted}


@pytest.mark.parametrize(
    ("swap", "phrase"),
    [
        pytest.param(
            lambda files, raw: rebuild(files, replace={MODEL: regular(MODEL, flip(files[MODEL]))}),
            "changed while extracting",
            id="flipped-model-byte",
        ),
        pytest.param(
            lambda files, raw: rebuild(files, drop=(VECTORS,)),
            "changed while extracting",
            id="missing-member",
        ),
        pytest.param(lambda files, raw: cut_inside(raw, VECTORS), NOT_AN_ARCHIVE, id="truncated"),
    ],
)
def test_extract_catches_a_bundle_swapped_after_verification(
    swap, phrase, cnn_bundle, bundle_files, keypair, tmp_path
):
    bundle = tmp_path / "bundle.edgepkg"
    bundle.write_bytes(cnn_bundle.read_bytes())
    verified = verify_bundle(bundle, keypair[1])
    bundle.write_bytes(swap(bundle_files, cnn_bundle.read_bytes()))
    target = tmp_path / "target"

    with pytest.raises(BundleError, match=phrase):
        extract_bundle(verified, target)

    assert files_under(target) == set()


@pytest.mark.parametrize(
    "opener",
    [
        pytest.param(open_runtime_into_target, id="runtime"),
        pytest.param(verify_then_extract, id="extract-bundle"),
    ],
)
def test_extract_refuses_before_writing_when_the_disk_is_too_full(
    opener, cnn_bundle, bundle_files, keypair, monkeypatch, tmp_path
):
    """The free space is faked (at its lowest seam): filling a disk is not a unit test."""
    real_usage = shutil.disk_usage
    asked = []

    def nearly_full(path):
        asked.append(Path(path))
        return real_usage(path)._replace(free=1000)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    target = tmp_path / "not" / "there"
    before = tree(tmp_path)
    needed = sum(len(data) for name, data in bundle_files.items() if name != SIGNATURE_NAME)

    with pytest.raises(BundleError) as caught:
        opener(cnn_bundle, keypair[1], target)

    assert str(caught.value) == (
        f"the bundle's files need {needed} bytes but {tmp_path} has 1000 free; free some "
        "space or extract elsewhere (extract_dir)"
    )
    assert asked == [tmp_path]
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("target", "phrase"),
    [
        pytest.param("a-file", "a-file is a file, not a folder", id="target-is-a-file"),
        pytest.param("a-file/target", "a-file is a file, not a folder", id="parent-is-a-file"),
    ],
)
def test_extract_into_a_file_is_refused(target, phrase, cnn_bundle, keypair, tmp_path):
    (tmp_path / "a-file").write_bytes(b"mine")
    before = tree(tmp_path)

    with pytest.raises(BundleError, match=re.escape(f"{phrase}; extract into an empty folder")):
        open_runtime_into_target(cnn_bundle, keypair[1], tmp_path / target)

    assert tree(tmp_path) == before
