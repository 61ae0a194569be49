import json

import pytest

from edge_runtime.bundle import verify_bundle
from edge_runtime.errors import BundleError
from edge_runtime.manifest import parse_manifest


def _manifest_dict(cnn_bundle, keypair):
    return json.loads(verify_bundle(cnn_bundle, keypair[1]).manifest_bytes)


def test_round_trip_is_canonical(cnn_bundle, keypair):
    verified = verify_bundle(cnn_bundle, keypair[1])

    assert parse_manifest(verified.manifest_bytes).to_bytes() == verified.manifest_bytes


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(schema_version=3), "schema_version 3 is not supported"),
        (lambda d: d.update(surprise=1), "Extra inputs are not permitted"),
        (lambda d: d["model"].update(path="model/other.onnx"), "is not among the manifest's files"),
        (lambda d: d["selftest"].update(path="x.npz"), "is not among the manifest's files"),
        (lambda d: d["backend"].update(name="tensorflow"), "backend.name"),
    ],
)
def test_invalid_manifests_are_refused(cnn_bundle, keypair, mutate, message):
    data = _manifest_dict(cnn_bundle, keypair)
    mutate(data)

    with pytest.raises(BundleError, match=message):
        parse_manifest(json.dumps(data).encode())


def test_non_json_and_oversized_manifests_are_refused():
    with pytest.raises(BundleError, match="not valid JSON"):
        parse_manifest(b"\xff{")
    with pytest.raises(BundleError, match="limit"):
        parse_manifest(b" " * (9 * 1024 * 1024))


def add_file(path: str):
    """A mutation listing one more file at ``path``."""
    entry = {"path": path, "role": "extra", "sha256": "0" * 64, "size": 1}
    return lambda data: data["files"].append(entry)


def set_input(**changes):
    return lambda data: data["inputs"][0].update(changes)


NAME_RULE = "bundles name members with '/'-separated components of letters, digits"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        pytest.param(
            add_file("model"),
            "files list 'model' as a file and 'model/model.onnx' inside it as a folder; "
            "a path cannot be both",
            id="file-and-folder",
        ),
        pytest.param(
            add_file("manifest.json/model.onnx"),
            "files list 'manifest.json' as a file and 'manifest.json/model.onnx' inside it",
            id="folder-under-the-manifest",
        ),
        pytest.param(
            add_file("Model/Model.onnx"),
            "files list 'Model/Model.onnx', which collides with 'model/model.onnx'",
            id="differs-only-in-case",
        ),
        pytest.param(
            add_file("model/model.onnx"),
            "files list 'model/model.onnx', which collides with 'model/model.onnx'",
            id="listed-twice",
        ),
        pytest.param(
            add_file("manifest.sig"),
            "files list 'manifest.sig', which collides with 'manifest.sig'",
            id="reserved-name",
        ),
        pytest.param(
            add_file(f"model/{'a' * 300}"),
            "is 300 characters; at most 255",
            id="300-character-component",
        ),
        pytest.param(
            add_file("x/" * 600 + "y"),
            "the path is 1201 characters; at most 1024",
            id="1201-character-path",
        ),
        pytest.param(
            add_file("model/a\0b.onnx"),
            f"'model/a\\x00b.onnx' cannot name a member: component 'a\\x00b.onnx' is not "
            f"allowed; {NAME_RULE}",
            id="nul-byte",
        ),
        pytest.param(add_file("/etc/passwd"), "the path is absolute", id="absolute"),
        pytest.param(add_file("model/../x"), "component '..' is not allowed", id="dotdot"),
        pytest.param(add_file("model//x"), "component '' is not allowed", id="double-slash"),
        pytest.param(add_file("a\\b"), "component 'a\\\\b' is not allowed", id="backslash"),
        pytest.param(add_file(""), "the path is empty", id="empty"),
        pytest.param(
            set_input(dtype="float1024"),
            "input 'image': dtype 'float1024' is not a tensor dtype (bool, complex128",
            id="dtype-float1024",
        ),
        pytest.param(
            set_input(dtype="object"),
            "input 'image': dtype 'object' is not a tensor dtype",
            id="dtype-object",
        ),
        pytest.param(
            lambda data: data["outputs"][0].update(dtype="V8"),
            "output 'logits': dtype 'V8' is not a tensor dtype",
            id="output-dtype-void",
        ),
        pytest.param(
            lambda data: data["inputs"].append(dict(data["inputs"][0])),
            "inputs name ['image'] more than once; each name is one tensor",
            id="input-twice",
        ),
        pytest.param(
            set_input(shape=[-1, 1, 8, 8]),
            "inputs.0.shape: [-1, 1, 8, 8]: a size is at least 0 (a free dimension is a name)",
            id="negative-dimension",
        ),
    ],
)
def test_unsafe_names_and_dtypes_are_refused_when_parsed(cnn_bundle, keypair, mutate, message):
    data = _manifest_dict(cnn_bundle, keypair)
    mutate(data)

    with pytest.raises(BundleError) as caught:
        parse_manifest(json.dumps(data).encode())

    assert message in str(caught.value)
    assert str(caught.value).startswith("manifest is invalid: ")
