"""The tar container of a ``.edgepkg``, read so that no header can crash or mislead the reader.

Anyone can hand a device a file, so everything here runs before the signature is checked
and must refuse, with a ``BundleError``, whatever ``tarfile`` would otherwise trip over:

- a member declaring more bytes than the file holds (``tarfile`` seeks past the end of the
  file for the next header, and the operating system answers ``EINVAL``);
- an extended header (pax, GNU long name) declaring gigabytes (``tarfile`` reads it into
  memory whole);
- GNU sparse members, links, folders, devices, and setuid, setgid or sticky bits: a bundle
  holds plain regular files and nothing else;
- a member name that is not a safe relative path (``edge_runtime.limits``).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from .errors import BundleError
from .limits import NAME_RULE, path_problem

# Header records whose data tarfile reads into memory: keep them small.
EXTENSION_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)
MAX_EXTENSION_BYTES = 1 << 20
PLAIN_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)
SPECIAL_MODE_BITS = 0o7000  # setuid, setgid, sticky

NOT_AN_ARCHIVE = "is not a readable .edgepkg archive"


def _file_size(archive: tarfile.TarFile) -> int:
    handle = archive.fileobj
    position = handle.tell()
    end = handle.seek(0, os.SEEK_END)
    handle.seek(position)
    return end


class ScreenedTarInfo(tarfile.TarInfo):
    """A TarInfo that checks each header's sizes before ``tarfile`` acts on them."""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        where = f"{archive.name} {NOT_AN_ARCHIVE}: archive member {self.name!r}"
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise BundleError(f"{where} is a GNU sparse file; bundles hold only regular files")
        file_size = _file_size(archive)
        left = file_size - self.offset - tarfile.BLOCKSIZE
        if self.type in EXTENSION_TYPES and self.size > MAX_EXTENSION_BYTES:
            raise BundleError(
                f"{where} has an extended header of {self.size} bytes (limit "
                f"{MAX_EXTENSION_BYTES}); the file was crafted or damaged"
            )
        if not 0 <= self.size <= left:
            raise BundleError(
                f"{where} declares {self.size} bytes but only {max(left, 0)} follow its header; "
                "the file is truncated or was crafted"
            )
        member = super()._proc_member(archive)
        # A pax header may set the size of the member after it: check that size too.
        end = member.offset_data + member.size
        if member.isreg() and not member.issparse() and (member.size < 0 or end > file_size):
            raise BundleError(
                f"{archive.name} {NOT_AN_ARCHIVE}: archive member {member.name!r} declares "
                f"{member.size} bytes but only {max(file_size - member.offset_data, 0)} follow "
                "its header; the file is truncated or was crafted"
            )
        return member


# What tarfile's parser raises on a malformed header, besides its own TarError.
_PARSE_ERRORS = (tarfile.TarError, OSError, ValueError, EOFError, IndexError)


def open_archive(path: Path) -> tarfile.TarFile:
    """Open ``path`` as an uncompressed tar whose headers are screened as they are read."""
    try:
        return tarfile.open(path, mode="r:", tarinfo=ScreenedTarInfo)
    except FileNotFoundError:
        raise BundleError(f"bundle {path} does not exist") from None
    except _PARSE_ERRORS as exc:
        raise BundleError(f"{path} {NOT_AN_ARCHIVE}: {exc}") from None


def safe_member_name(name: str) -> str:
    """``name`` when it is a safe relative member path; else BundleError."""
    problem = path_problem(name)
    if problem is not None:
        raise BundleError(
            f"archive member {name!r} has an unsafe path; the bundle is refused ({problem}; "
            f"{NAME_RULE})"
        )
    return name


def _kind(info: tarfile.TarInfo) -> str:
    if info.issparse():
        return "GNU sparse file"
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hard link"
    return "non-file"


def screen_members(archive: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """Index the members, refusing anything but uniquely named plain files at safe paths."""
    members: dict[str, tarfile.TarInfo] = {}
    try:
        infos = archive.getmembers()
    except _PARSE_ERRORS as exc:  # e.g. a truncated archive
        raise BundleError(f"{archive.name} {NOT_AN_ARCHIVE}: {exc}") from None
    for info in infos:
        name = safe_member_name(info.name)
        if info.type not in PLAIN_TYPES or info.issparse():
            raise BundleError(
                f"archive member {name!r} is a {_kind(info)}; bundles hold only regular files"
            )
        if info.mode & SPECIAL_MODE_BITS:
            raise BundleError(
                f"archive member {name!r} has mode {info.mode:04o} (setuid, setgid or sticky "
                "bits); bundles hold only plain files, mode 0644"
            )
        if name in members:
            raise BundleError(f"archive member {name!r} appears twice; the bundle is refused")
        members[name] = info
    return members
