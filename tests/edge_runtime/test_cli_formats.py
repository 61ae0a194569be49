"""Every bundle-reading command on every model format: ``edgepack inspect``, ``edgepack
verify``, ``edge-runtime info`` and ``edge-runtime selftest``, with and without ``--json``.

One ONNX, one TFLite and one GGUF session bundle; each case asserts the exit code and the
lines (or JSON keys) a person or a script relies on. The summary rows come from
edge_runtime/summary.py, shared by ``inspect`` and ``info``, so both must show the same.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edge_runtime.cli import cli as edge_runtime_cli
from edge_runtime.signing import key_id, load_public_key
from packager.cli import cli as edgepack_cli

FORMATS = [
    pytest.param(
        "cnn_bundle",
        {
            "backend": "backend    onnx: CPUExecutionProvider",
            "model": "model      model/model.onnx: int8-static-qdq-per-channel (int8), opset ",
            "signature": "inputs     image: float32[batch, 1, 8, 8]",
            "selftest": "self-test  8 vectors, atol ",
        },
        id="onnx",
    ),
    pytest.param(
        "tflite_pi4_bundle",
        {
            "backend": "backend    tflite: XNNPACK on, 4 threads",
            "model": "model      model/model.tflite: int8-static (int8), signature serving_default",
            "signature": "inputs     image: float32[1, 1, 8, 8]",
            "selftest": "self-test  8 vectors, atol ",
        },
        id="tflite",
    ),
    pytest.param(
        "smollm2_pi5_bundle",
        {
            "backend": "backend    llamacpp",
            "model": "model      model/model.gguf: Q4_K_M (Q4_K_M), GGUF",
            "signature": "llm        llama, 135M parameters, Q4_K_M from F16",
            "selftest": "self-test  16 greedy tokens after 'Once upon a time",
        },
        id="gguf",
        marks=pytest.mark.slow,
    ),
]
FORMAT_OF = {"cnn_bundle": "onnx", "tflite_pi4_bundle": "tflite", "smollm2_pi5_bundle": "gguf"}


def invoke(cli, *args: object):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def row_starting(text: str, prefix: str) -> str:
    rows = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, f"no single {prefix!r} row in:\n{text}"
    return rows[0]


@pytest.mark.parametrize(("fixture", "expected"), FORMATS)
def test_inspect_shows_the_summary(fixture, expected, request):
    bundle = request.getfixturevalue(fixture)

    result = invoke(edgepack_cli, "inspect", bundle)

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("bundle     ")
    assert lines[1].startswith("signed by  not checked here")
    assert row_starting(result.output, "backend ").startswith(expected["backend"])
    for key in ("model", "signature", "selftest"):
        assert row_starting(result.output, expected[key][:10]).startswith(expected[key])
    assert row_starting(result.output, "gate ").endswith(" passed")
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("fixture", "expected"), FORMATS)
def test_inspect_json_is_the_manifest_as_signed(fixture, expected, request):
    bundle = request.getfixturevalue(fixture)

    result = invoke(edgepack_cli, "inspect", bundle, "--json")

    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output)
    assert manifest["schema_version"] == 2
    assert manifest["model"]["format"] == FORMAT_OF[fixture]
    assert manifest["selftest"]["kind"] in ("tensors", "greedy-tokens")


@pytest.mark.parametrize(("fixture", "expected"), FORMATS)
def test_info_shows_the_same_summary_as_inspect_and_the_signer(fixture, expected, request, keypair):
    bundle = request.getfixturevalue(fixture)

    info = invoke(edge_runtime_cli, "info", bundle, "--pubkey", keypair[1])
    inspected = invoke(edgepack_cli, "inspect", bundle)

    assert info.exit_code == 0, info.output
    lines = info.output.splitlines()
    assert lines[1] == f"signed by  {key_id(load_public_key(keypair[1]))}"
    # Apart from the signer, the two commands print the same rows.
    assert (
        lines[:1] + lines[2:]
        == inspected.output.splitlines()[:1] + (inspected.output.splitlines()[2:])
    )
    assert row_starting(info.output, "backend ").startswith(expected["backend"])


@pytest.mark.parametrize(("fixture", "expected"), FORMATS)
def test_info_json_has_the_signer_and_the_manifest(fixture, expected, request, keypair):
    bundle = request.getfixturevalue(fixture)

    result = invoke(edge_runtime_cli, "info", bundle, "--pubkey", keypair[1], "--json")

    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["signed_by"] == key_id(load_public_key(keypair[1]))
    assert document["manifest"]["model"]["format"] == FORMAT_OF[fixture]


@pytest.mark.parametrize(("fixture", "expected"), FORMATS)
def test_verify_accepts_the_bundle(fixture, expected, request, keypair):
    bundle = request.getfixturevalue(fixture)

    plain = invoke(edgepack_cli, "verify", bundle, "--pubkey", keypair[1])
    as_json = invoke(edgepack_cli, "verify", bundle, "--pubkey", keypair[1], "--json")

    assert plain.exit_code == 0, plain.output
    signer = key_id(load_public_key(keypair[1]))
    assert plain.output.startswith(f"OK: {bundle} is signed by {signer}; ")
    assert plain.output.rstrip().endswith("files match their sha256")
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output)["key_id"] == signer


@pytest.mark.parametrize(("fixture", "expected"), FORMATS)
def test_verify_refuses_another_key(fixture, expected, request, other_keypair):
    bundle = request.getfixturevalue(fixture)

    result = invoke(edgepack_cli, "verify", bundle, "--pubkey", other_keypair[1])

    assert result.exit_code == 1
    assert "bundle signature does not verify" in result.output + str(result.exception)


@pytest.mark.parametrize(("fixture", "expected"), FORMATS)
def test_selftest_passes(fixture, expected, request, keypair):
    bundle = request.getfixturevalue(fixture)

    plain = invoke(edge_runtime_cli, "selftest", bundle, "--pubkey", keypair[1])
    as_json = invoke(edge_runtime_cli, "selftest", bundle, "--pubkey", keypair[1], "--json")

    assert plain.exit_code == 0, plain.output
    assert plain.stdout.startswith("self-test PASS: ")
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert report["passed"] is True
    if FORMAT_OF[fixture] == "gguf":
        assert "greedy tokens match the build host's" in plain.output
        assert report["expected_tokens"] == 16
    else:
        assert "8 vectors, max abs error" in plain.output
        assert report["vectors"] == 8
