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
