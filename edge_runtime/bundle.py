"""Reading a ``.edgepkg``: verify everything first, then extract only what the manifest lists.

Order matters for safety: headers are screened (``edge_runtime.archive``: sizes, types,
modes, names), the manifest signature is checked, the manifest is parsed (which checks
its file names and dtypes), and every member is hashed from the archive, all before a
single byte is written to disk.
Extraction then writes files itself (never ``tarfile.extract``) and re-hashes while
writing, so a file swapped on disk between the two reads is caught too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from .archive import open_archive, screen_members
from .errors import BundleError
from .manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest, parse_manifest
from .signing import verify_manifest_signature

_CHUNK = 1 << 20


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature and member hashes all checked out."""

    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    key_id: str


def _read_member(archive: tarfile.TarFile, info: tarfile.TarInfo, limit: int) -> bytes:
    if info.size > limit:
        raise BundleError(f"archive member {info.name!r} is {info.size} bytes; limit {limit}")
    handle = archive.extractfile(info)
    assert handle is not None  # regular files always have data
    return handle.read()


def verify_bundle(path: Path, pubkey: Path | None = None) -> VerifiedBundle:
    """Verify a bundle's signature and every member hash without extracting anything.

    Args:
        path: the ``.edgepkg`` file.
        pubkey: PEM Ed25519 public key; None uses the keys in ``$EDGEPACK_TRUSTED_KEYS``.

    Returns:
        The verified manifest and the id of the key that signed it.

    Raises:
        BundleError: the archive is malformed, unsafe, tampered with, or incomplete.
        SignatureError: the signature does not verify.
        TrustError: no key was given and none is trusted.
    """
    path = Path(path)
    with open_archive(path) as archive:
        members = screen_members(archive)
        for required in (MANIFEST_NAME, SIGNATURE_NAME):
            if required not in members:
                raise BundleError(f"{path} has no {required}; it is not an edgepack bundle")
        manifest_bytes = _read_member(archive, members[MANIFEST_NAME], 8 * 1024 * 1024)
        signature = _read_member(archive, members[SIGNATURE_NAME], 1024)
        # The signature is checked before the manifest is even parsed.
        signer = verify_manifest_signature(manifest_bytes, signature, pubkey)
        manifest = parse_manifest(manifest_bytes)

        listed = {entry.path: entry for entry in manifest.files}
        unexpected = sorted(set(members) - set(listed) - {MANIFEST_NAME, SIGNATURE_NAME})
        if unexpected:
            raise BundleError(f"archive holds members the manifest does not list: {unexpected}")
        # Names, collisions and reserved names were checked when the manifest was parsed.
        for entry in manifest.files:
            info = members.get(entry.path)
            if info is None:
                raise BundleError(f"manifest lists {entry.path!r} but the archive lacks it")
            if info.size != entry.size:
                raise BundleError(
                    f"{entry.path!r} is {info.size} bytes but the manifest declares {entry.size}"
                )
            handle = archive.extractfile(info)
            assert handle is not None
            digest = _hash_stream(handle)
            if digest != entry.sha256:
                raise BundleError(f"{entry.path!r} does not match its sha256 in the manifest")
    return VerifiedBundle(
        path=path, manifest=manifest, manifest_bytes=manifest_bytes, key_id=signer
    )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (models can be gigabytes)."""
    with open(path, "rb") as handle:
        return _hash_stream(handle)


def _hash_stream(handle) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _create_new(destination: Path) -> int:
    # O_EXCL + O_NOFOLLOW: never follow or overwrite something already there.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(destination, flags, 0o644)
    except FileExistsError:
        raise BundleError(f"{destination} already exists; extract into an empty folder") from None


@dataclass
class Extraction:
    """What ``extract_into`` created: its files and the folders it made, outermost first."""

    root: Path
    files: list[Path] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)

    def remove(self) -> None:
        """Remove what the extraction created, and nothing that was there before it."""
        for path in reversed(self.files):
            path.unlink(missing_ok=True)
        for folder in reversed(self.folders):
            with contextlib.suppress(OSError):  # something else was put there: leave it
                folder.rmdir()

    def make_folder(self, folder: Path) -> None:
        """Create ``folder`` and its missing parents, remembering each one created."""
        missing = []
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        if not folder.is_dir():
            raise BundleError(f"{folder} is a file, not a folder; extract into an empty folder")
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:  # made meanwhile by someone else: not ours to remove
                if not path.is_dir():
                    raise BundleError(f"{path} exists and is not a folder") from None
                continue
            self.folders.append(path)


def _check_free_space(verified: VerifiedBundle, target: Path) -> None:
    """Refuse before writing when ``target``'s filesystem cannot hold the files."""
    folder = target
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the folder that will hold target, which may not exist yet
    needed = sum(entry.size for entry in verified.manifest.files) + len(verified.manifest_bytes)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise BundleError(
            f"the bundle's files need {needed} bytes but {folder} has {free} free; "
            "free some space or extract elsewhere (extract_dir)"
        )


def extract_bundle(verified: VerifiedBundle, target: Path) -> Path:
    """Write the manifest's files from a verified bundle into ``target`` (created if needed).

    Each file is re-hashed while it is written; on any mismatch what was written is
    removed and BundleError is raised. Nothing is written outside ``target``.
    """
    return extract_into(verified, target).root


def extract_into(verified: VerifiedBundle, target: Path) -> Extraction:
    """``extract_bundle``, returning what was created so that a caller can undo it
    (``Extraction.remove``) when a later step, such as loading the model, fails."""
    target = Path(target).absolute()
    extraction = Extraction(target)
    try:
        _check_free_space(verified, target)
        extraction.make_folder(target)
        root = extraction.root = target.resolve()
        with open_archive(verified.path) as archive:
            members = screen_members(archive)
            for entry in verified.manifest.files:
                destination = (root / entry.path).resolve()
                if root not in destination.parents:
                    raise BundleError(f"{entry.path!r} would land outside {root}")
                if entry.path not in members:
                    raise BundleError(f"{entry.path!r} changed while extracting; bundle refused")
                extraction.make_folder(destination.parent)
                handle = archive.extractfile(members[entry.path])
                assert handle is not None
                digest = hashlib.sha256()
                size = 0
                fd = _create_new(destination)
                extraction.files.append(destination)
                with os.fdopen(fd, "wb") as out:
                    while chunk := handle.read(_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                if digest.hexdigest() != entry.sha256 or size != entry.size:
                    raise BundleError(f"{entry.path!r} changed while extracting; bundle refused")
            fd = _create_new(root / MANIFEST_NAME)
            extraction.files.append(root / MANIFEST_NAME)
            with os.fdopen(fd, "wb") as out:
                out.write(verified.manifest_bytes)
    except BaseException as exc:
        extraction.remove()
        if isinstance(exc, OSError):  # the target's filesystem refused (permissions, space)
            raise BundleError(
                f"cannot extract into {target}: {exc}; extract into a folder you can write "
                "to, with room for the bundle"
            ) from None
        raise
    return extraction
