"""Deterministic .npz writing shared by the examples and the packager."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

# A fixed timestamp keeps the zip headers free of wall-clock time (reproducible bundles).
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)


def save_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` like ``np.savez`` but byte-identically for identical arrays."""
    path.write_bytes(npz_bytes(arrays))


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_DATE)
            info.external_attr = 0o644 << 16
            member = io.BytesIO()
            np.lib.format.write_array(
                member, np.ascontiguousarray(arrays[name]), allow_pickle=False
            )
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()
