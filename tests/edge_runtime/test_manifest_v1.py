"""Manifest schema 2's discriminators, and v1 bundles: ``upgrade_v1`` in edge_runtime/manifest.py.

A device may hold bundles built before schema 2. The v1 bundles here are written at test
time (tests/edge_runtime/conftest.py) from real ONNX, TFLite and GGUF bundles, signed with
the test key; each must still verify, self-test, run and show in every CLI.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edge_runtime.bundle import verify_bundle
from edge_runtime.cli import cli as edge_runtime_cli
from edge_runtime.errors import BundleError
from edge_runtime.manifest import (
    LlamaCppBackendSpec,
    LlmMeasurements,
    Measurements,
    OnnxBackendSpec,
    SelfTestSpec,
    TfliteBackendSpec,
    TokenSelfTestSpec,
    parse_manifest,
    upgrade_v1,
)
from edge_runtime.runtime import Runtime
from edge_runtime.selftest import load_vectors
from packager.cli import cli as edgepack_cli
from tests.edge_runtime.conftest import V1_BACKEND_KEYS, v1_manifest

V1_BUNDLES = [
    pytest.param("cnn_v1_bundle", "cnn_bundle", OnnxBackendSpec, id="onnx"),
    pytest.param("tflite_v1_bundle", "tflite_pi4_bundle", TfliteBackendSpec, id="tflite"),
    pytest.param(
        "smollm2_v1_bundle",
        "smollm2_pi5_bundle",
        LlamaCppBackendSpec,
        id="gguf",
        marks=pytest.mark.slow,
    ),
]


def stored_manifest(bundle, keypair) -> dict:
    return json.loads(verify_bundle(bundle, keypair[1]).manifest_bytes)


# --- upgrade_v1, without a model -----------------------------------------------------------


def flat_backend(name: str, **values) -> dict:
    backend = {
        "name": name,
        "providers": [],
        "intra_op_threads": 4,
        "enable_cpu_mem_arena": False,
        "allow_spinning": True,
        "gpu_layers": 0,
        "xnnpack": True,
    }
    return {**backend, **values}


@pytest.mark.parametrize(
    ("v1_backend", "expected"),
    [
        pytest.param(
            flat_backend("onnx", providers=["CPUExecutionProvider"], allow_spinning=False),
            {
                "name": "onnx",
                "providers": ["CPUExecutionProvider"],
                "intra_op_threads": 4,
                "enable_cpu_mem_arena": False,
                "allow_spinning": False,
            },
            id="onnx",
        ),
        pytest.param(
            {"name": "onnx", "intra_op_threads": 0},
            {"name": "onnx", "intra_op_threads": 0, "allow_spinning": True},
            id="onnx-v1-spinning-default",
        ),
        pytest.param(
            flat_backend("tflite", xnnpack=False),
            {"name": "tflite", "intra_op_threads": 4, "xnnpack": False},
            id="tflite",
        ),
        pytest.param(
            flat_backend("llamacpp", gpu_layers=-1),
            {"name": "llamacpp", "intra_op_threads": 4, "gpu_layers": -1},
            id="llamacpp",
        ),
    ],
)
def test_upgrade_v1_keeps_only_the_engines_own_settings(v1_backend, expected):
    upgraded = upgrade_v1({"schema_version": 1, "backend": v1_backend})

    assert upgraded["backend"] == expected
    assert upgraded["schema_version"] == 1


@pytest.mark.parametrize(
    ("section", "v1_value", "kind"),
    [
        pytest.param("measurements", {"host": "h", "latency_ms_p50": 1.0}, "tensor", id="tensor"),
        pytest.param("measurements", {"host": "h", "tg_tokens_per_s": 9.0}, "llm", id="llm"),
        pytest.param("selftest", {"path": "s.npz", "count": 2}, "tensors", id="vectors"),
        pytest.param("selftest", {"prompt": "p", "tokens": [1]}, "greedy-tokens", id="tokens"),
    ],
)
def test_upgrade_v1_adds_the_kind_its_fields_imply(section, v1_value, kind):
    upgraded = upgrade_v1({"schema_version": 1, section: v1_value})

    assert upgraded[section] == {"kind": kind, **v1_value}


def test_upgrade_v1_leaves_its_argument_alone():
    v1 = {"schema_version": 1, "backend": flat_backend("onnx"), "selftest": {"count": 1}}
    before = json.dumps(v1, sort_keys=True)

    upgrade_v1(v1)

    assert json.dumps(v1, sort_keys=True) == before


# --- discriminators: what a v2 manifest must say ------------------------------------------


def v2_manifest(cnn_bundle, keypair) -> dict:
    return stored_manifest(cnn_bundle, keypair)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        pytest.param(
            lambda d: d["backend"].update(gpu_layers=0),
            "backend.onnx.gpu_layers: Extra inputs are not permitted",
            id="llamacpp-key-on-onnx",
        ),
        pytest.param(
            lambda d: d["backend"].update(xnnpack=True),
            "backend.onnx.xnnpack: Extra inputs are not permitted",
            id="tflite-key-on-onnx",
        ),
        pytest.param(
            lambda d: d["backend"].update(name="tensorflow"),
            "backend.name: 'tensorflow' is not one of 'onnx', 'tflite', 'llamacpp'",
            id="unknown-engine",
        ),
        pytest.param(lambda d: d["backend"].pop("name"), "backend.name: missing", id="no-engine"),
        pytest.param(
            lambda d: d["selftest"].update(kind="images"),
            "selftest.kind: 'images' is not one of 'tensors', 'greedy-tokens'",
            id="unknown-selftest-kind",
        ),
        pytest.param(lambda d: d["selftest"].pop("kind"), "selftest.kind: missing", id="no-kind"),
        pytest.param(
            lambda d: d["backend"].update(name="llamacpp", providers=None),
            "backend.llamacpp.providers: Extra inputs are not permitted",
            id="onnx-key-on-llamacpp",
        ),
        pytest.param(
            lambda d: d.update(backend={"name": "tflite"}),
            "manifest: a onnx model runs on backend 'onnx', not 'tflite'",
            id="engine-for-another-format",
        ),
    ],
)
def test_v2_manifest_with_a_wrong_discriminated_section_is_refused(
    cnn_bundle, keypair, mutate, message
):
    data = v2_manifest(cnn_bundle, keypair)
    mutate(data)

    with pytest.raises(BundleError) as caught:
        parse_manifest(json.dumps(data).encode())

    assert message in str(caught.value)
    assert str(caught.value).startswith("manifest is invalid: ")
    assert "rebuild the bundle with this edgepack" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_v2_measurements_of_an_unknown_kind_are_refused(cnn_bundle, keypair):
    data = v2_manifest(cnn_bundle, keypair)
    data["measurements"] = {"kind": "energy", "host": "h"}

    with pytest.raises(BundleError, match="measurements.kind: 'energy' is not one of"):
        parse_manifest(json.dumps(data).encode())


def test_v1_manifest_with_a_malformed_backend_is_refused(cnn_bundle, keypair):
    data = v1_manifest(v2_manifest(cnn_bundle, keypair))
    data["backend"]["name"] = "tensorflow"

    with pytest.raises(BundleError, match="backend.name: 'tensorflow' is not one of"):
        parse_manifest(json.dumps(data).encode())


# --- real v1 bundles ----------------------------------------------------------------------


@pytest.mark.parametrize(("v1_fixture", "v2_fixture", "spec_type"), V1_BUNDLES)
def test_v1_bundle_is_written_in_the_v1_form(v1_fixture, v2_fixture, spec_type, request, keypair):
    stored = stored_manifest(request.getfixturevalue(v1_fixture), keypair)

    assert stored["schema_version"] == 1
    assert tuple(stored["backend"]) == tuple(sorted(V1_BACKEND_KEYS))
    assert "steps" not in stored
    assert "kind" not in stored["selftest"]
    assert stored["measurements"] is None or "kind" not in stored["measurements"]


@pytest.mark.parametrize(("v1_fixture", "v2_fixture", "spec_type"), V1_BUNDLES)
def test_v1_bundle_reads_as_the_v2_bundle_it_came_from(
    v1_fixture, v2_fixture, spec_type, request, keypair
):
    old = verify_bundle(request.getfixturevalue(v1_fixture), keypair[1]).manifest
    new = verify_bundle(request.getfixturevalue(v2_fixture), keypair[1]).manifest

    assert isinstance(old.backend, spec_type)
    assert old.schema_version == 1
    assert old.backend == new.backend
    assert old.selftest == new.selftest
    assert old.measurements == new.measurements
    assert old.serving is None  # v1 wrote no serving section: serve does not batch it
    upgraded = {"schema_version": 2, "steps": new.steps, "serving": new.serving}
    assert old.model_copy(update=upgraded) == new


@pytest.mark.parametrize(("v1_fixture", "v2_fixture", "spec_type"), V1_BUNDLES)
def test_v1_bundle_opens_self_tests_and_runs(v1_fixture, v2_fixture, spec_type, request, keypair):
    bundle = request.getfixturevalue(v1_fixture)

    with Runtime.open(bundle, keypair[1]) as runtime:
        report = runtime.selftest()
        if runtime.manifest.selftest.kind == "greedy-tokens":
            assert isinstance(runtime.manifest.selftest, TokenSelfTestSpec)
            assert isinstance(runtime.manifest.measurements, LlmMeasurements | None)
            stream = runtime.generate("The three primary colors are", temperature=0, max_tokens=4)
            text = stream.read()
            assert text.strip() and stream.completion_tokens == 4
        else:
            assert isinstance(runtime.manifest.selftest, SelfTestSpec)
            assert isinstance(runtime.manifest.measurements, Measurements | None)
            inputs, references = load_vectors(runtime.model_dir / runtime.manifest.selftest.path)
            outputs = runtime.run({name: value[:1] for name, value in inputs.items()})
            assert set(outputs) == set(references)
            assert all(np.isfinite(value).all() for value in outputs.values())

    assert report.passed, report.failures


@pytest.mark.parametrize(("v1_fixture", "v2_fixture", "spec_type"), V1_BUNDLES)
def test_v1_bundle_in_every_cli(v1_fixture, v2_fixture, spec_type, request, keypair):
    bundle = str(request.getfixturevalue(v1_fixture))
    pubkey = ["--pubkey", str(keypair[1])]
    runner = CliRunner()

    verified = runner.invoke(edgepack_cli, ["verify", bundle, *pubkey])
    info = runner.invoke(edge_runtime_cli, ["info", bundle, *pubkey])
    info_json = runner.invoke(edge_runtime_cli, ["info", bundle, *pubkey, "--json"])
    selftest = runner.invoke(edge_runtime_cli, ["selftest", bundle, *pubkey])
    shown = runner.invoke(edgepack_cli, ["inspect", bundle])
    shown_json = runner.invoke(edgepack_cli, ["inspect", bundle, "--json"])

    results = [verified, info, info_json, selftest, shown, shown_json]
    assert [result.exit_code for result in results] == [0] * 6, [r.output for r in results]
    assert verified.output.startswith("OK: ")
    assert "self-test PASS" in selftest.output
    engine = spec_type().name
    for text in (info.output, shown.output):
        assert ", manifest schema 1" in text
        assert f"backend    {engine}" in text
    # --json shows the manifest as signed: the v1 form, flat backend and all.
    assert json.loads(info_json.output)["manifest"]["backend"]["gpu_layers"] == 0
    assert json.loads(shown_json.output)["schema_version"] == 1
