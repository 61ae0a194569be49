"""Validly signed, hostile bundles: what a compromised build host or a stolen key can send.

The signature verifies, so only the runtime's own checks stand between such a bundle and
the device. Each case must end in a typed error (or, for vectors that test nothing, a
failed self-test), write nothing outside the target folder and leave no extraction folder
behind, whether ``Runtime.open`` extracts into a folder it was given or a temporary one.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.errors import BackendError, BundleError
from edge_runtime.runtime import Runtime
from tests.edge_runtime.hostile import (
    MODEL,
    OPENERS,
    VECTORS,
    contents,
    npy_bytes,
    npz_bytes,
    read_files,
    saved_npz,
    signed_bundle,
)

PARSE_REFUSED = "manifest is invalid: "


def listing(path: str, data: bytes) -> dict[str, Any]:
    return {"path": path, "role": "extra", "sha256": hashlib.sha256(data).hexdigest(), "size": 1}


def first_input(**changes):
    return lambda manifest: manifest["inputs"][0].update(changes)


# Manifests the parser refuses: (edit, extra members, phrase).
REFUSED_WHEN_PARSED = {
    "file-and-folder": (
        lambda manifest: manifest["files"].append(listing("model", b"x")),
        {"model": b"x"},
        f"files list 'model' as a file and {MODEL!r} inside it as a folder",
    ),
    "300-character-component": (
        lambda manifest: manifest["files"].append(listing(f"model/{'a' * 300}", b"x")),
        {},
        "is 300 characters; at most 255",
    ),
    "nul-byte-in-path": (
        lambda manifest: manifest["files"].append(listing("model/a\0b.onnx", b"x")),
        {},
        "component 'a\\x00b.onnx' is not allowed",
    ),
    "input-dtype-float1024": (
        first_input(dtype="float1024"),
        {},
        "input 'image': dtype 'float1024' is not a tensor dtype",
    ),
}


@pytest.fixture(scope="module")
def cnn_files(cnn_bundle) -> dict[str, bytes]:
    return read_files(cnn_bundle)


@pytest.fixture(scope="module")
def tflite_files(tflite_pi4_bundle) -> dict[str, bytes]:
    return read_files(tflite_pi4_bundle)


def assert_nothing_left(tmp_path: Path, before: dict, target: Path) -> None:
    """Nothing written anywhere under tmp_path (the temporary folder included)."""
    assert contents(tmp_path) == before
    assert not target.exists()
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("opener", OPENERS.values(), ids=OPENERS.keys())
@pytest.mark.parametrize(
    ("edit", "extra", "phrase"), REFUSED_WHEN_PARSED.values(), ids=REFUSED_WHEN_PARSED.keys()
)
def test_a_signed_manifest_with_bad_names_or_dtypes_is_refused(
    edit, extra, phrase, opener, cnn_files, keypair, tmp_path
):
    bundle = signed_bundle(cnn_files, keypair[0], tmp_path / "b.edgepkg", edit=edit, extra=extra)
    target = tmp_path / "target"
    before = contents(tmp_path)

    with pytest.raises(BundleError, match=re.escape(phrase)) as caught:
        opener(bundle, keypair[1], target)

    assert str(caught.value).startswith(PARSE_REFUSED)
    assert_nothing_left(tmp_path, before, target)


RUNTIME_OPENERS = {name: opener for name, opener in OPENERS.items() if name.startswith("runtime")}


def rename_first(kind: str, name: str):
    def edit(manifest: dict[str, Any]) -> None:
        manifest[kind][0]["name"] = name

    return edit


@pytest.mark.parametrize("opener", RUNTIME_OPENERS.values(), ids=RUNTIME_OPENERS.keys())
@pytest.mark.parametrize(
    ("files", "edit", "phrase"),
    [
        pytest.param(
            "cnn_files",
            rename_first("inputs", "pixels"),
            "the manifest does not describe model/model.onnx: inputs ['pixels'] are not the "
            "model's; the model's inputs ['image'] are not listed",
            id="onnx-input-the-model-lacks",
        ),
        pytest.param(
            "cnn_files",
            rename_first("outputs", "scores"),
            "outputs ['scores'] are not the model's (the model has inputs ['image'], "
            "outputs ['logits']); the bundle was built wrong",
            id="onnx-output-the-model-lacks",
        ),
        pytest.param(
            "cnn_files",
            lambda manifest: manifest.update(feeding={"constants": {"image": "abc"}}),
            "the manifest's feeding constants do not fit their inputs (could not convert "
            "string to float: 'abc'); rebuild the bundle",
            id="feeding-constant-the-dtype-refuses",
        ),
        pytest.param(
            "tflite_files",
            rename_first("inputs", "pixels"),
            "the manifest does not describe model/model.tflite: inputs ['pixels'] are not "
            "the model's",
            id="tflite-input-the-model-lacks",
        ),
    ],
)
def test_a_manifest_that_does_not_fit_the_model_is_refused_at_open(
    files, edit, phrase, opener, request, keypair, tmp_path
):
    source = request.getfixturevalue(files)
    bundle = signed_bundle(source, keypair[0], tmp_path / "b.edgepkg", edit=edit)
    target = tmp_path / "target"
    before = contents(tmp_path)

    with pytest.raises(BundleError, match=re.escape(phrase)):
        opener(bundle, keypair[1], target)

    assert_nothing_left(tmp_path, before, target)


def onnx_called_tflite(manifest: dict[str, Any]) -> None:
    manifest["model"].update(format="tflite", opset=None)
    manifest["backend"] = {"name": "tflite", "intra_op_threads": 1, "xnnpack": True}


@pytest.mark.parametrize(
    ("edit", "error", "phrase"),
    [
        pytest.param(
            onnx_called_tflite,
            BackendError,
            f"refusing to load {MODEL}: ",
            id="backend-refuses-the-model",
        ),
        pytest.param(
            rename_first("inputs", "pixels"),
            BundleError,
            "inputs ['pixels'] are not the model's",
            id="tensor-names-differ",
        ),
    ],
)
def test_a_refused_model_leaves_the_callers_folder_as_it_was(
    edit, error, phrase, cnn_files, keypair, tmp_path
):
    """The caller's folder exists and holds a file of theirs: that file alone remains."""
    bundle = signed_bundle(cnn_files, keypair[0], tmp_path / "b.edgepkg", edit=edit)
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    before = contents(tmp_path)

    with pytest.raises(error, match=re.escape(phrase)):
        Runtime.open(bundle, keypair[1], extract_dir=target)

    assert contents(tmp_path) == before
    assert [path.name for path in target.iterdir()] == ["notes.txt"]


# --- self-test vectors --------------------------------------------------------------------

IMAGE = np.zeros((8, 1, 8, 8), np.float32)
LOGITS = np.zeros((8, 10), np.float32)

BAD_VECTORS = {
    "pickled-object-array": (
        saved_npz(**{"input.image": np.array([{}], dtype=object), "reference.logits": LOGITS}),
        "array 'input.image' holds Python objects: pickled arrays are refused",
    ),
    "truncated-npz": (
        saved_npz(**{"input.image": IMAGE, "reference.logits": LOGITS})[:700],
        "is not a readable .npz of plain arrays",
    ),
    "npy-header-claims-512-GiB": (
        npz_bytes(
            {
                "input.image.npy": npy_bytes("<f4", (1 << 37,), bytes(64)),
                "reference.logits.npy": npy_bytes("<f4", (8, 10), LOGITS.tobytes()),
            }
        ),
        f"array 'input.image' declares float32[{1 << 37}], 512.0 GiB, but the file holds "
        "64 bytes of it; the file is truncated or was crafted",
    ),
}


@pytest.mark.parametrize("extract_dir", [False, True], ids=["temp-dir", "extract-dir"])
@pytest.mark.parametrize(("vectors", "phrase"), BAD_VECTORS.values(), ids=BAD_VECTORS.keys())
def test_unreadable_selftest_vectors_are_a_bundle_error(
    vectors, phrase, extract_dir, cnn_files, keypair, tmp_path
):
    bundle = signed_bundle(
        cnn_files, keypair[0], tmp_path / "b.edgepkg", replace={VECTORS: vectors}
    )
    target = tmp_path / "target"
    outside = contents(tmp_path)

    runtime = Runtime.open(bundle, keypair[1], extract_dir=target if extract_dir else None)
    with runtime, pytest.raises(BundleError, match=re.escape(phrase)) as caught:
        runtime.selftest()

    assert str(caught.value).startswith("the bundle's self-test vectors vectors.npz")
    assert list((tmp_path / "tmp").iterdir()) == []
    assert {k: v for k, v in contents(tmp_path).items() if not k.startswith("target")} == outside


@pytest.mark.parametrize(
    ("vectors", "phrases"),
    [
        pytest.param(
            {"input.image": IMAGE},
            [
                f"{VECTORS} holds no reference outputs (reference.NAME), so nothing would be "
                "compared; the bundle was built wrong, rebuild it"
            ],
            id="no-reference-arrays",
        ),
        pytest.param(
            {"input.image": IMAGE[:2], "reference.logits": LOGITS[:2]},
            [
                "input 'image' holds 2 vectors; the manifest says 8",
                "reference 'logits' holds 2 vectors; the manifest says 8",
            ],
            id="fewer-vectors-than-the-count",
        ),
        pytest.param(
            {"input.image": IMAGE, "reference.logits": LOGITS, "reference.scores": LOGITS},
            [f"{VECTORS} holds references for outputs ['scores'] the model lacks"],
            id="reference-for-an-output-the-model-lacks",
        ),
        pytest.param(
            {"reference.logits": LOGITS},
            [f"{VECTORS} lacks the inputs ['image']"],
            id="no-input-arrays",
        ),
    ],
)
def test_vectors_that_cannot_test_the_model_fail_the_selftest(
    vectors, phrases, cnn_files, keypair, tmp_path
):
    bundle = signed_bundle(
        cnn_files, keypair[0], tmp_path / "b.edgepkg", replace={VECTORS: saved_npz(**vectors)}
    )

    with Runtime.open(bundle, keypair[1]) as runtime:
        report = runtime.selftest()

    assert not report.passed
    assert report.vectors == 0
    assert report.failures == phrases
