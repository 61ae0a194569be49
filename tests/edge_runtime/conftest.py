"""The ``edge-runtime`` console script in a subprocess, and bundles in the v1 manifest
form, written at test time from the session bundles.

edgepack before manifest schema 2 wrote one flat ``backend`` object holding every
engine's settings, no ``kind`` discriminators and no ``steps``. ``as_v1_bundle`` rewrites
a bundle the current packager built into exactly that form, re-signs it with the test
key and writes it the way ``packager.bundle_writer`` does, so the runtime meets the bytes
a device holding an old bundle has.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.manifest import MANIFEST_NAME, SIGNATURE_NAME, canonical_json
from packager.bundle_writer import write_bundle
from packager.keys import load_private_key

# Every key of v1's flat BackendSpec, which wrote them all (model_dump keeps defaults).
V1_BACKEND_KEYS = (
    "name",
    "providers",
    "intra_op_threads",
    "enable_cpu_mem_arena",
    "allow_spinning",
    "gpu_layers",
    "xnnpack",
)


def v1_manifest(data: dict[str, Any]) -> dict[str, Any]:
    """A v2 manifest's JSON as edgepack's v1 writer wrote it."""
    v1 = copy.deepcopy(data)
    v1["schema_version"] = 1
    backend = v1["backend"]
    v1["backend"] = {
        "name": backend["name"],
        "providers": backend.get("providers", []),
        "intra_op_threads": backend["intra_op_threads"],
        "enable_cpu_mem_arena": backend.get("enable_cpu_mem_arena", False),
        "allow_spinning": backend.get("allow_spinning", True),
        "gpu_layers": backend.get("gpu_layers", 0),
        "xnnpack": backend.get("xnnpack", True),
    }
    v1.pop("steps", None)
    v1.pop("serving", None)  # schema 2 only
    if v1.get("measurements") is not None:
        v1["measurements"].pop("kind")
    v1["selftest"].pop("kind")
    return v1


def as_v1_bundle(bundle: Path, private_key: Path, output: Path) -> Path:
    """Copy ``bundle`` with its manifest in v1 form, validly signed with ``private_key``."""
    scratch = output.with_name(output.name + ".members")
    with tarfile.open(bundle, mode="r:") as archive:
        members = {info.name: archive.extractfile(info).read() for info in archive.getmembers()}
        mtime = archive.getmember(MANIFEST_NAME).mtime
    manifest = canonical_json(v1_manifest(json.loads(members.pop(MANIFEST_NAME))))
    members.pop(SIGNATURE_NAME)
    files = {}
    for name, content in members.items():
        path = scratch / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        files[name] = path
    signature = load_private_key(private_key).sign(manifest)
    return write_bundle(output, manifest, signature, files, mtime)


def _v1(request, fixture: str, keypair, tmp_path_factory) -> Path:
    bundle = request.getfixturevalue(fixture)
    return as_v1_bundle(bundle, keypair[0], tmp_path_factory.mktemp("v1") / f"v1-{bundle.name}")


@pytest.fixture(scope="session")
def cnn_v1_bundle(request, keypair, tmp_path_factory) -> Path:
    return _v1(request, "cnn_bundle", keypair, tmp_path_factory)


@pytest.fixture(scope="session")
def tflite_v1_bundle(request, keypair, tmp_path_factory) -> Path:
    return _v1(request, "tflite_pi4_bundle", keypair, tmp_path_factory)


@pytest.fixture(scope="session")
def smollm2_v1_bundle(request, keypair, tmp_path_factory) -> Path:
    return _v1(request, "smollm2_pi5_bundle", keypair, tmp_path_factory)


@pytest.fixture
def edge_runtime(tmp_path):
    """Run the installed ``edge-runtime`` console script in a subprocess."""
    script = Path(sys.executable).with_name("edge-runtime")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "edge_runtime.cli"]
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}

    def invoke(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
        )

    return invoke
