"""``edgepack freeze``: the device runtime as a self-contained executable (PyInstaller).

PyInstaller bundles the Python interpreter and the libraries it finds on *this* machine,
so the executable runs only on this machine's architecture (and a glibc at least as
new). It does not cross-compile: for an arm64 device, freeze on an arm64 machine, or
inside the emulated Raspberry Pi OS (``scripts/arm64-rootfs.sh``; see
docs/offline-install.md).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import PackagerError
from .formats import format_for_engine, formats
from .profiles import DeviceProfile

# Host-side and test-only packages that must never end up in a device executable.
EXCLUDED = [
    "packager",
    "collector",
    "torch",
    "transformers",
    "onnx",
    "onnxconverter_common",
    "sklearn",
    "scipy",
    "matplotlib",
    "PIL",
    "tkinter",
    "IPython",
    "pytest",
    "rich",
    "psycopg",
    "amqtt",
    # pulled in by onnxruntime's optional tools (quantization, transformers helpers)
    "ml_dtypes",
    "psutil",
    "setuptools",
    "tqdm",
    "requests",
    "sympy",
    "coloredlogs",
    "pkg_resources",
]
ENTRY = "from edge_runtime.cli import main\n\nmain()\n"
HOST_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass(frozen=True)
class FrozenRuntime:
    form: str  # "onefile" or "onedir"
    executable: Path
    size_bytes: int  # the file, or the whole folder
    seconds: float  # how long PyInstaller took


def check_host_matches(profile: DeviceProfile) -> None:
    """Raise PackagerError unless this machine has the profile's architecture."""
    host = HOST_ARCH.get(platform.machine().lower(), platform.machine())
    if host != profile.arch.value:
        raise PackagerError(
            f"profile {profile.name!r} is {profile.arch.value} but this machine is {host}; "
            "PyInstaller does not cross-compile. Freeze on an arm64 machine, or inside the "
            "emulated Raspberry Pi OS: scripts/arm64-rootfs.sh (docs/offline-install.md)"
        )


def _folder_size(path: Path) -> int:
    return sum(
        item.stat().st_size for item in path.rglob("*") if item.is_file() and not item.is_symlink()
    )


def pyinstaller_args(form: str, backends: list[str], out_dir: Path, work: Path) -> list[str]:
    """The PyInstaller command line for one form, with only ``backends``' engines."""
    # What each engine needs kept in (or out) is declared by its format (DeviceRuntime).
    devices = {backend: format_for_engine(backend).device for backend in backends}
    args = ["--noconfirm", "--clean", "--log-level", "WARN", "--name", "edge-runtime"]
    args += [f"--{form}", "--distpath", str(out_dir / form), "--workpath", str(work / form)]
    args += ["--specpath", str(work)]
    for backend, device in devices.items():
        args += ["--hidden-import", f"edge_runtime.backends.{backend}"]
        if device.collect_all:
            args += ["--collect-all", device.engine_package]
        for module in device.hidden_imports:
            args += ["--hidden-import", module]
        for distribution in device.metadata:
            args += ["--copy-metadata", distribution]
    for pipeline in formats().values():
        if pipeline.engine not in devices:
            args += [
                "--exclude-module",
                pipeline.device.engine_package,
                "--exclude-module",
                f"edge_runtime.backends.{pipeline.engine}",
            ]
    for module in EXCLUDED:
        args += ["--exclude-module", module]
    # the agent's MQTT client is imported lazily, so PyInstaller would not see it
    args += ["--hidden-import", "edge_runtime.telemetry.client", "--hidden-import", "paho.mqtt"]
    return args


def freeze_runtime(
    profile: DeviceProfile,
    backends: list[str],
    out_dir: Path,
    forms: tuple[str, ...] = ("onefile", "onedir"),
    progress: Callable[[str], None] = lambda message: None,
) -> list[FrozenRuntime]:
    """Build ``edge-runtime`` executables for ``profile`` with only ``backends``.

    Raises:
        PackagerError: wrong architecture, PyInstaller missing, or PyInstaller failed.
    """
    check_host_matches(profile)
    try:
        import PyInstaller  # noqa: F401
    except ImportError:
        raise PackagerError(
            "edgepack freeze needs PyInstaller: pip install 'edgepack[freeze]'"
        ) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "build"
    work.mkdir(exist_ok=True)
    entry = work / "edge_runtime_main.py"
    entry.write_text(ENTRY, encoding="utf-8")
    results = []
    for form in forms:
        progress(f"PyInstaller --{form} with backends {', '.join(backends)} (a minute or two)")
        started = time.perf_counter()
        command = [
            sys.executable,
            "-m",
            "PyInstaller",
            *pyinstaller_args(form, backends, out_dir, work),
        ]
        done = subprocess.run([*command, str(entry)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise PackagerError(f"PyInstaller failed ({form}): {done.stderr.strip()[-2000:]}")
        seconds = time.perf_counter() - started
        if form == "onefile":
            executable = out_dir / form / "edge-runtime"
            size = executable.stat().st_size
        else:
            executable = out_dir / form / "edge-runtime" / "edge-runtime"
            size = _folder_size(executable.parent)
        results.append(FrozenRuntime(form, executable, size, seconds))
    shutil.rmtree(work, ignore_errors=True)
    return results
