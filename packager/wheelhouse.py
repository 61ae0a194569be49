"""An offline wheelhouse for a bundle's device: every wheel the runtime needs, for the
profile's own platform and Python, with their hashes in the signed manifest.

The wheelhouse is a folder written beside the bundle (``NAME.wheels/``), so the runtime
never extracts tens of megabytes of wheels when it opens the bundle. It holds:

- ``edgepack_runtime-*.whl``: edgepack's device runtime with only the bundle's backend;
- the runtime's dependencies, downloaded by pip for the target platform (no building);
- ``install.sh``: ``scripts/install-on-device.sh``, which checks every hash, verifies the
  signature and installs into a venv with ``pip --no-index --require-hashes``.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from edge_runtime.backends import BACKENDS
from edge_runtime.bundle import sha256_file
from edge_runtime.manifest import WheelEntry, WheelhouseSpec

from .errors import PackagerError
from .formats import format_for_engine

RUNTIME_DIST = "edgepack-runtime"
INSTALL_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install-on-device.sh"
_MANYLINUX = re.compile(r"^manylinux_(\d+)_(\d+)_(\w+)$")
_NOT_FOUND = re.compile(r"No matching distribution found for ([A-Za-z0-9_.\-]+)")


def declared_requirements(extra: str | None) -> list[str]:
    """edgepack's requirements as its installed metadata declares them (pyproject.toml):
    the unconditional ones (``extra`` None) or those of one extra."""
    declared = []
    for line in metadata.requires("edgepack") or []:
        requirement, _, marker = line.partition(";")
        if (f'extra == "{extra}"' in marker) if extra else not marker.strip():
            declared.append(requirement.strip())
    return declared


def runtime_requirements(backend: str) -> list[str]:
    """What a device needs to run ``backend`` and report: the core, telemetry, the engine."""
    device = format_for_engine(backend).device
    return [
        *declared_requirements(None),
        *declared_requirements("telemetry"),
        *declared_requirements(device.extra),
    ]


def wheelhouse_dir(bundle: Path) -> Path:
    return bundle.with_name(bundle.stem + ".wheels")


def platform_tags(platform_tag: str) -> list[str]:
    """``manylinux_2_28_aarch64`` -> every manylinux tag a 2.28 glibc accepts, newest first.

    pip does not widen a ``--platform`` by itself, so older-glibc wheels (most of PyPI's
    aarch64 wheels are manylinux2014, i.e. 2.17) must be asked for explicitly.
    """
    match = _MANYLINUX.match(platform_tag)
    if not match:
        return [platform_tag]
    major, minor, arch = int(match[1]), int(match[2]), match[3]
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 16, -1)]
    return tags + [f"manylinux2014_{arch}"]


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def build_runtime_wheel(out_dir: Path, backend: str, version: str) -> Path:
    """Write ``edgepack_runtime-VERSION-py3-none-any.whl``: ``edge_runtime`` with one backend.

    The wheel is built by hand (it is a zip with three metadata files), so it needs no
    build backend on the host and is byte-for-byte reproducible.
    """
    requires = runtime_requirements(backend)  # refuses an unknown backend
    source = Path(__file__).resolve().parent.parent / "edge_runtime"
    skip = {  # the other backends' modules, e.g. backends/tflite.py
        f"backends/{target.split(':')[0].rsplit('.', 1)[-1]}.py"
        for other, target in BACKENDS.items()
        if other != backend
    }
    files: dict[str, bytes] = {}
    for path in sorted(source.rglob("*.py")):
        relative = path.relative_to(source).as_posix()
        if relative not in skip:
            files[f"edge_runtime/{relative}"] = path.read_bytes()
    dist_info = f"edgepack_runtime-{version}.dist-info"
    files[f"{dist_info}/METADATA"] = (
        "Metadata-Version: 2.1\n"
        f"Name: {RUNTIME_DIST}\nVersion: {version}\n"
        f"Summary: edgepack device runtime ({backend} backend only)\n"
        "Requires-Python: >=3.10\n" + "".join(f"Requires-Dist: {req}\n" for req in requires)
    ).encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: edgepack\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{dist_info}/entry_points.txt"] = (
        b"[console_scripts]\nedge-runtime = edge_runtime.cli:main\n"
    )
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name, data in files.items():
        writer.writerow([name, _record_hash(data), len(data)])
    writer.writerow([f"{dist_info}/RECORD", "", ""])
    files[f"{dist_info}/RECORD"] = record.getvalue().encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"edgepack_runtime-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, data, zipfile.ZIP_DEFLATED)
    return wheel


def download_wheels(
    requirements: list[str], platform_tag: str, python_version: str, dest: Path
) -> tuple[list[str], list[str]]:
    """``pip download`` binary wheels for the target; returns (downloaded reqs, missing).

    A requirement with no wheel for the platform is dropped and reported, and the rest
    are downloaded again without it, so one missing wheel does not sink the wheelhouse.
    """
    wanted, missing = list(requirements), []
    while wanted:
        command = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "-q"]
        for tag in platform_tags(platform_tag):
            command += ["--platform", tag]
        version = python_version.replace(".", "")
        command += ["--python-version", python_version, "--implementation", "cp"]
        command += ["--abi", f"cp{version}", "--abi", "abi3", "--abi", "none"]
        command += ["-d", str(dest), *wanted]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return wanted, missing
        absent = _NOT_FOUND.search(done.stderr)
        if not absent:
            raise PackagerError(
                f"pip could not download wheels for {platform_tag} / CPython {python_version}: "
                f"{done.stderr.strip()[-1500:]}"
            )
        name = _canonical(absent[1])
        kept = [req for req in wanted if _canonical(_req_name(req)) != name]
        if len(kept) == len(wanted):  # a dependency of a requirement has no wheel
            raise PackagerError(
                f"PyPI has no {platform_tag} wheel for {absent[1]}, which a runtime "
                "dependency needs; build it on a device (pip wheel) and pass --extra-wheels DIR"
            )
        missing.append(_req_name(next(r for r in wanted if r not in kept)))
        wanted = kept
    return wanted, missing


def _req_name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def build_wheelhouse(
    bundle: Path,
    backend: str,
    platform_tag: str,
    python_version: str,
    version: str,
    extra_wheels: Path | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> WheelhouseSpec:
    """Fill ``NAME.wheels/`` beside ``bundle``; return what the manifest records.

    Raises:
        PackagerError: pip cannot reach PyPI, or a dependency has no wheel at all.
    """
    folder = wheelhouse_dir(bundle)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    progress(f"wheelhouse: edgepack runtime wheel ({backend} backend only)")
    build_runtime_wheel(folder, backend, version)
    requirements = runtime_requirements(backend)
    progress(f"wheelhouse: downloading wheels for {platform_tag}, CPython {python_version}")
    _, missing = download_wheels(requirements, platform_tag, python_version, folder)
    if extra_wheels is not None:
        for wheel in sorted(Path(extra_wheels).glob("*.whl")):
            shutil.copy2(wheel, folder / wheel.name)
            missing = [m for m in missing if not wheel.name.lower().startswith(_wheel_stem(m))]
    for name in missing:
        progress(
            f"warning: PyPI has no {platform_tag} wheel for {name}; the wheelhouse lacks it. "
            "Build one on a device or in the emulated system (see docs/offline-install.md) "
            "and pass --extra-wheels DIR"
        )
    shutil.copy2(INSTALL_SCRIPT, folder / "install.sh")
    wheels = [
        WheelEntry(name=path.name, sha256=sha256_file(path), size=path.stat().st_size)
        for path in sorted(folder.glob("*.whl"))
    ]
    return WheelhouseSpec(
        folder=folder.name,
        platform_tag=platform_tag,
        python_version=python_version,
        requirements=requirements,
        wheels=wheels,
        missing=missing,
    )


def _wheel_stem(name: str) -> str:
    return re.sub(r"[-.]+", "_", name).lower() + "-"
