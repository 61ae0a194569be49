"""Reading a ``.edgepkg``: verify everything first, then extract only what the manifest lists.

Order matters for safety: headers are screened, the manifest signature is checked, and
every member is hashed from the archive, all before a single byte is written to disk.
Extraction then writes files itself (never ``tarfile.extract``) and re-hashes while
writing, so a file swapped on disk between the two reads is caught too.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path

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


def _safe_member_name(name: str) -> str:
    normalized = posixpath.normpath(name)
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or normalized != name
        or normalized.startswith("..")
        or "/../" in f"/{name}/"
    ):
        raise BundleError(f"archive member {name!r} has an unsafe path; the bundle is refused")
    return name


def _open_archive(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:")
    except FileNotFoundError:
        raise BundleError(f"bundle {path} does not exist") from None
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"{path} is not a readable .edgepkg archive: {exc}") from None


def _screen_members(archive: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """Index the members, refusing anything but uniquely named regular files at safe paths."""
    members: dict[str, tarfile.TarInfo] = {}
    try:
        infos = archive.getmembers()
    except tarfile.TarError as exc:  # e.g. a truncated archive
        raise BundleError(f"{archive.name} is not a readable .edgepkg archive: {exc}") from None
    for info in infos:
        name = _safe_member_name(info.name)
        if not info.isreg():
            kind = "symlink" if info.issym() else "hard link" if info.islnk() else "non-file"
            raise BundleError(
                f"archive member {name!r} is a {kind}; bundles hold only regular files"
            )
        if name in members:
            raise BundleError(f"archive member {name!r} appears twice; the bundle is refused")
        members[name] = info
    return members


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
    with _open_archive(path) as archive:
        members = _screen_members(archive)
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
        for entry in manifest.files:
            _safe_member_name(entry.path)
            if entry.path in (MANIFEST_NAME, SIGNATURE_NAME):
                raise BundleError(f"manifest lists the reserved name {entry.path!r} as a file")
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


def extract_bundle(verified: VerifiedBundle, target: Path) -> Path:
    """Write the manifest's files from a verified bundle into ``target`` (created if needed).

    Each file is re-hashed while it is written; on any mismatch the partial output is
    removed and BundleError is raised. Nothing is written outside ``target``.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    written: list[Path] = []
    try:
        with _open_archive(verified.path) as archive:
            members = _screen_members(archive)
            for entry in verified.manifest.files:
                destination = (root / entry.path).resolve()
                if root not in destination.parents:
                    raise BundleError(f"{entry.path!r} would land outside {root}")
                if entry.path not in members:
                    raise BundleError(f"{entry.path!r} changed while extracting; bundle refused")
                destination.parent.mkdir(parents=True, exist_ok=True)
                handle = archive.extractfile(members[entry.path])
                assert handle is not None
                digest = hashlib.sha256()
                size = 0
                fd = _create_new(destination)
                written.append(destination)
                with os.fdopen(fd, "wb") as out:
                    while chunk := handle.read(_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                if digest.hexdigest() != entry.sha256 or size != entry.size:
                    raise BundleError(f"{entry.path!r} changed while extracting; bundle refused")
            fd = _create_new(root / MANIFEST_NAME)
            written.append(root / MANIFEST_NAME)
            with os.fdopen(fd, "wb") as out:
                out.write(verified.manifest_bytes)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return root
