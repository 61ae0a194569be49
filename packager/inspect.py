"""Reading a bundle's manifest for display, without a key.

The summary itself is ``edge_runtime.summary``, shared with ``edge-runtime info``.
"""

from __future__ import annotations

from pathlib import Path

from edge_runtime.archive import open_archive, screen_members
from edge_runtime.errors import BundleError
from edge_runtime.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, parse_manifest
from edge_runtime.summary import format_row, summary_rows


def read_manifest_bytes_unverified(bundle: Path) -> bytes:
    """The bytes of ``bundle``'s manifest as stored, NOT signature-checked (display only).

    The headers are screened as the device screens them (``edge_runtime.archive``), so a
    crafted file is a one-line error here too.
    """
    with open_archive(bundle) as archive:
        info = screen_members(archive).get(MANIFEST_NAME)
        if info is None:
            raise BundleError(f"{bundle} has no {MANIFEST_NAME}; it is not an edgepack bundle")
        if info.size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{bundle}: {MANIFEST_NAME} is not a plain, small file")
        handle = archive.extractfile(info)
        return handle.read() if handle else b""


def read_manifest_unverified(bundle: Path) -> Manifest:
    """The manifest of ``bundle``, parsed but NOT signature-checked (display only)."""
    return parse_manifest(read_manifest_bytes_unverified(bundle))


def summary(manifest: Manifest) -> str:
    """The shared summary as rich markup: the first row bold, user strings escaped."""
    from rich.markup import escape

    lines = [escape(format_row(label, value)) for label, value in summary_rows(manifest)]
    lines[0] = f"[bold]{lines[0]}[/bold]"
    return "\n".join(lines)
