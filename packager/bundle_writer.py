"""Writing a ``.edgepkg``: a deterministic, uncompressed POSIX tar.

Members are sorted, owned by 0:0 with empty user and group names, mode 0644, and stamped
with the build's ``created`` time (``SOURCE_DATE_EPOCH`` when set), never the wall clock.
Same inputs, same bytes. The archive is written to a temporary name and renamed, so a
failed build never leaves a half-written bundle behind.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from edge_runtime.manifest import MANIFEST_NAME, SIGNATURE_NAME


def _info(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_bundle(
    output: Path,
    manifest_bytes: bytes,
    signature: bytes,
    files: dict[str, Path],
    mtime: int,
) -> Path:
    """Write the archive: manifest, signature, then ``files`` (archive name -> source)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    members: dict[str, bytes | Path] = {MANIFEST_NAME: manifest_bytes, SIGNATURE_NAME: signature}
    members.update(files)
    try:
        with tarfile.open(partial, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for name in sorted(members):
                content = members[name]
                if isinstance(content, bytes):
                    archive.addfile(_info(name, len(content), mtime), io.BytesIO(content))
                else:
                    with open(content, "rb") as handle:
                        size = os.fstat(handle.fileno()).st_size
                        archive.addfile(_info(name, size, mtime), handle)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return output
