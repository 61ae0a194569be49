"""The offline wheelhouse: runtime wheel, platform wheels, hashes in the signed manifest, and
``install-on-device.sh`` on this host (the emulated arm64 case is tests/integration/test_arm64.py).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import tomllib
from packaging.requirements import Requirement

from edge_runtime.bundle import sha256_file, verify_bundle
from packager import wheelhouse
from packager.errors import PackagerError
from packager.wheelhouse import (
    build_runtime_wheel,
    download_wheels,
    platform_tags,
    wheelhouse_dir,
)
from tests.conftest import REPO, build_example

INSTALL = REPO / "scripts" / "install-on-device.sh"


def _normalized(requirements: list[str]) -> set[str]:
    return {str(Requirement(text)) for text in requirements}


@pytest.mark.parametrize(
    "backend, extra", [("onnx", "onnx"), ("llamacpp", "llm"), ("tflite", "tflite")]
)
def test_requirements_come_from_pyproject(backend, extra):
    """The wheelhouse repeats no requirement by hand: it reads edgepack's own metadata."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    wanted = project["dependencies"] + extras["telemetry"] + extras[extra]

    assert _normalized(wheelhouse.runtime_requirements(backend)) == _normalized(wanted)
    assert len(wheelhouse.runtime_requirements(backend)) == len(wanted)


def test_requirements_refuse_an_unknown_backend():
    with pytest.raises(PackagerError, match="unknown backend 'tensorrt'; choose from"):
        wheelhouse.runtime_requirements("tensorrt")


def test_platform_tags_widen_to_older_glibc():
    tags = platform_tags("manylinux_2_28_aarch64")

    assert tags[0] == "manylinux_2_28_aarch64"
    assert "manylinux_2_17_aarch64" in tags and tags[-1] == "manylinux2014_aarch64"
    assert platform_tags("linux_armv7l") == ["linux_armv7l"]


@pytest.mark.parametrize(
    "backend, other", [("onnx", "llamacpp"), ("llamacpp", "tflite"), ("tflite", "onnx")]
)
def test_runtime_wheel_holds_one_backend_and_a_valid_record(tmp_path, backend, other):
    wheel = build_runtime_wheel(tmp_path, backend, "1.2.3")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read("edgepack_runtime-1.2.3.dist-info/METADATA").decode()
        record = archive.read("edgepack_runtime-1.2.3.dist-info/RECORD").decode()
        contents = {name: archive.read(name) for name in names}
    assert f"edge_runtime/backends/{backend}.py" in names
    assert f"edge_runtime/backends/{other}.py" not in names
    assert not any(name.startswith(("packager/", "collector/")) for name in names)
    for requirement in wheelhouse.runtime_requirements(backend):
        assert f"Requires-Dist: {requirement}\n" in metadata
    for name, digest, size in csv.reader(io.StringIO(record)):
        if digest:
            raw = hashlib.sha256(contents[name]).digest()
            assert digest == "sha256=" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
            assert int(size) == len(contents[name])


def test_runtime_wheel_is_reproducible(tmp_path):
    first = build_runtime_wheel(tmp_path / "a", "onnx", "0.1.0")
    second = build_runtime_wheel(tmp_path / "b", "onnx", "0.1.0")

    assert first.read_bytes() == second.read_bytes()


def test_a_requirement_without_a_wheel_for_the_platform_is_reported_not_fatal(tmp_path):
    wanted, missing = download_wheels(
        ["click>=8.1", "llama-cpp-python>=0.3.16,<0.4"], "manylinux_2_28_aarch64", "3.11", tmp_path
    )

    assert missing == ["llama-cpp-python"]
    assert wanted == ["click>=8.1"]
    assert [p.name.split("-")[0] for p in tmp_path.glob("*.whl")] == ["click"]


@pytest.fixture(scope="module")
def x86_bundle_with_wheels(digits_example, keypair, tmp_path_factory):
    output = tmp_path_factory.mktemp("wheels") / "digits-x86.edgepkg"
    build_example(digits_example, keypair[0], output, "x86-64-avx2", with_wheels=True)
    return output


def test_manifest_lists_every_wheel_with_its_hash(x86_bundle_with_wheels, keypair):
    manifest = verify_bundle(x86_bundle_with_wheels, keypair[1]).manifest
    folder = wheelhouse_dir(x86_bundle_with_wheels)

    spec = manifest.wheelhouse
    assert spec.folder == folder.name and spec.missing == []
    assert spec.platform_tag == "manylinux_2_28_x86_64" and spec.python_version == "3.11"
    assert {w.name for w in spec.wheels} == {p.name for p in folder.glob("*.whl")}
    assert all(sha256_file(folder / w.name) == w.sha256 for w in spec.wheels)
    names = {w.name.split("-")[0].lower() for w in spec.wheels}
    assert {"edgepack_runtime", "onnxruntime", "numpy", "pydantic", "paho_mqtt"} <= names
    assert not names & {"onnx", "torch", "llama_cpp_python"}
    assert (folder / "install.sh").read_bytes() == INSTALL.read_bytes()


def install(bundle, pubkey, venv, *extra) -> subprocess.CompletedProcess:
    # The device has python3 on PATH but not this project's .venv.
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if ".venv" not in p)
    return subprocess.run(
        ["bash", str(INSTALL), str(bundle), "--pubkey", str(pubkey), "--venv", str(venv), *extra],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PATH": path},
    )


@pytest.mark.slow
@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the x86 profile's wheels are cp311")
def test_install_script_installs_offline_and_the_runtime_works(
    x86_bundle_with_wheels, keypair, tmp_path
):
    venv = tmp_path / "venv"

    done = install(x86_bundle_with_wheels, keypair[1], venv)

    assert done.returncode == 0, done.stderr
    assert "wheels match the manifest's sha256" in done.stdout
    assert "verified with openssl" in done.stdout or "checked right after" in done.stdout
    selftest = subprocess.run(
        [str(venv / "bin" / "edge-runtime"), "selftest", str(x86_bundle_with_wheels)]
        + ["--pubkey", str(keypair[1])],
        capture_output=True,
        text=True,
    )
    assert "self-test PASS" in selftest.stdout, selftest.stderr
    freeze = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "freeze"], text=True, capture_output=True
    ).stdout.lower()
    assert "onnxruntime" in freeze and "torch" not in freeze and "llama" not in freeze


@pytest.mark.parametrize(
    "damage, phrase",
    [
        ("tamper", "does not match the sha256 in the signed manifest"),
        ("extra", "holds wheels the manifest does not list"),
        ("remove", "lacks wheels the manifest lists"),
        ("wrong-key", "does not verify"),
    ],
)
def test_install_script_refuses_before_installing(
    x86_bundle_with_wheels, keypair, other_keypair, tmp_path, damage, phrase
):
    device = tmp_path / "device"
    shutil.copytree(x86_bundle_with_wheels.parent, device)
    bundle = device / x86_bundle_with_wheels.name
    wheels = wheelhouse_dir(bundle)
    pubkey = other_keypair[1] if damage == "wrong-key" else keypair[1]
    click_wheel = next(wheels.glob("click-*.whl"))
    if damage == "tamper":
        data = bytearray(click_wheel.read_bytes())
        data[len(data) // 2] ^= 0xFF
        click_wheel.write_bytes(bytes(data))
    elif damage == "extra":
        shutil.copy(click_wheel, wheels / "evil-1.0-py3-none-any.whl")
    elif damage == "remove":
        click_wheel.unlink()

    done = install(bundle, pubkey, tmp_path / "venv")

    assert done.returncode == 1
    assert phrase in done.stderr
    assert not (tmp_path / "venv").exists()


def test_install_script_without_a_wheelhouse_says_how_to_make_one(cnn_bundle, keypair, tmp_path):
    done = install(cnn_bundle, keypair[1], tmp_path / "venv")

    assert done.returncode == 1
    assert "--with-wheels" in done.stderr
