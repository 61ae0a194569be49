"""Hostile bundles and array files for the runtime's tests, and checks that nothing was written.

Two kinds of attacker are modelled. Anyone can hand a device a file: ``tar_bytes`` and
``raw_member`` build archives whose headers lie, and the runtime must refuse them before
it checks the signature. A compromised build host (or a stolen key) signs what it likes:
``signed_bundle`` rewrites a real bundle's manifest and members and signs it with the
test key, and the runtime must still refuse with a typed error, never a traceback.
"""

from __future__ import annotations

import hashlib
import io
import json
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.bundle import extract_bundle, verify_bundle
from edge_runtime.manifest import MANIFEST_NAME, SIGNATURE_NAME, canonical_json
from edge_runtime.runtime import Runtime
from packager.keys import load_private_key

MODEL = "model/model.onnx"
VECTORS = "selftest/vectors.npz"

Member = tuple[tarfile.TarInfo, bytes]


# --- archives ---------------------------------------------------------------------------


def read_files(bundle: Path) -> dict[str, bytes]:
    """The members of a real bundle, in archive order."""
    with tarfile.open(bundle, mode="r:") as archive:
        return {info.name: archive.extractfile(info).read() for info in archive.getmembers()}


def regular(name: str, data: bytes, mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def tar_bytes(members: list[Member]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def raw_member(info: tarfile.TarInfo, data: bytes, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """One member's header as ``info`` says (sizes that lie included), then ``data`` padded.

    ``tarfile`` writes a header as told but would copy ``info.size`` bytes of data; this
    writes the header alone, so a header can declare more than follows it.
    """
    padding = -len(data) % tarfile.BLOCKSIZE
    return info.tobuf(fmt, tarfile.ENCODING, "surrogateescape") + data + bytes(padding)


def end_of_archive() -> bytes:
    return bytes(2 * tarfile.BLOCKSIZE)


# --- signed by a compromised build host -------------------------------------------------


def signed_bundle(
    files: dict[str, bytes],
    private_key: Path,
    output: Path,
    *,
    edit: Callable[[dict[str, Any]], None] | None = None,
    replace: dict[str, bytes] | None = None,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """A copy of a bundle's ``files`` with its manifest changed, validly signed.

    Args:
        files: the members of a real bundle (``read_files``).
        private_key: the key to sign with (the test key the runtime trusts).
        output: where to write the bundle.
        edit: changes the manifest's JSON in place, after ``replace`` updated it.
        replace: new content of listed members; their sha256 and size are updated.
        extra: members added to the archive as they are (listed or not).
    """
    manifest = json.loads(files[MANIFEST_NAME])
    members = {n: data for n, data in files.items() if n not in (MANIFEST_NAME, SIGNATURE_NAME)}
    for name, data in (replace or {}).items():
        members[name] = data
        for entry in manifest["files"]:
            if entry["path"] == name:
                entry.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    if edit is not None:
        edit(manifest)
    members.update(extra or {})
    manifest_bytes = canonical_json(manifest)
    signature = load_private_key(private_key).sign(manifest_bytes)
    archive = [regular(MANIFEST_NAME, manifest_bytes), regular(SIGNATURE_NAME, signature)]
    archive += [regular(name, data) for name, data in members.items()]
    output.write_bytes(tar_bytes(archive))
    return output


# --- what was written -------------------------------------------------------------------


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Everything under ``root`` (mode, size, mtime), without following links."""
    result = {}
    for path in root.rglob("*"):
        facts = path.lstat()
        result[str(path.relative_to(root))] = (facts.st_mode, facts.st_size, facts.st_mtime_ns)
    return result


def contents(root: Path) -> dict[str, tuple[int, int, int]]:
    """``tree(root)`` with folders' times left out: a folder made and removed inside one
    touches its mtime, but leaves nothing behind."""
    return {
        name: (mode, 0, 0) if stat.S_ISDIR(mode) else (mode, size, mtime)
        for name, (mode, size, mtime) in tree(root).items()
    }


def tree_outside(root: Path, excluded: str) -> dict[str, tuple[int, int, int]]:
    """``tree(root)`` without the folder ``excluded`` and what it holds."""
    return {
        name: facts
        for name, facts in tree(root).items()
        if name != excluded and not name.startswith(f"{excluded}/")
    }


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


# --- the three ways a bundle is opened --------------------------------------------------


def open_runtime_into_target(bundle: Path, pubkey: Path, target: Path) -> None:
    Runtime.open(bundle, pubkey, extract_dir=target).close()


def open_runtime_into_temp(bundle: Path, pubkey: Path, target: Path) -> None:
    Runtime.open(bundle, pubkey).close()


def verify_then_extract(bundle: Path, pubkey: Path, target: Path) -> None:
    extract_bundle(verify_bundle(bundle, pubkey), target)


OPENERS = {
    "runtime-extract-dir": open_runtime_into_target,
    "runtime-temp-dir": open_runtime_into_temp,
    "extract-bundle": verify_then_extract,
}


# --- array files ------------------------------------------------------------------------


def npy_bytes(descr: str, shape: tuple[int, ...], data: bytes = b"") -> bytes:
    """An .npy header declaring ``descr`` (e.g. "<f4") of ``shape``, then ``data``, which
    may hold far fewer bytes than the header claims."""
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + data


def npz_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    """A zip of ``members`` (name -> bytes), as np.savez writes one."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def saved_npz(**arrays: Any) -> bytes:
    """What np.savez writes for ``arrays`` (object arrays pickled, as np.savez does)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


TIB = 1 << 40
GIB = 1 << 30


def without_thread_note(text: str) -> str:
    """stderr without the runtime's note that it capped the profile's threads at this
    host's CPUs (printed on any host with fewer cores than the profile)."""
    return "".join(
        line for line in text.splitlines(keepends=True) if not line.startswith("note: threads:")
    )
