"""Tests for edge_runtime/backends/tflite.py on the real converted digits CNN.

Both interpreter packages are exercised: ai_edge_litert in the dev venv, and
tflite_runtime 2.14 (numpy<2) in a venv of its own, where the backend must fall back to it.
"""

from __future__ import annotations

import json
import sys
import threading

import numpy as np
import pytest

from edge_runtime import Runtime
from edge_runtime.backends import BackendOptions, create_backend
from edge_runtime.backends.tflite import (
    INTERPRETER_ENV,
    TfliteSession,
    import_interpreter,
)
from edge_runtime.bundle import extract_bundle, verify_bundle
from edge_runtime.cpus import usable_cpus
from edge_runtime.errors import BackendError, InputSignatureError
from tests.numerics import assert_close_across_kernels
from tests.tflite_runtime_venv import ensure_tflite_runtime_venv, run_in_venv


@pytest.fixture(scope="module")
def images(digits_tflite_example) -> np.ndarray:
    with np.load(digits_tflite_example.eval) as data:
        return data["image"][:32]


@pytest.fixture(scope="module")
def extracted(tflite_x86_bundle, keypair, tmp_path_factory):
    verified = verify_bundle(tflite_x86_bundle, keypair[1])
    return extract_bundle(verified, tmp_path_factory.mktemp("extracted")), verified.manifest


def _logits(run, images: np.ndarray) -> np.ndarray:
    return np.concatenate([run({"image": images[i : i + 1]})["logits"] for i in range(len(images))])


# -- choosing the interpreter package ------------------------------------------------------


def test_ai_edge_litert_is_preferred():
    name, module = import_interpreter()
    assert name == "ai_edge_litert"
    assert module.__name__ == "ai_edge_litert.interpreter"


def _only_tflite_runtime(monkeypatch, numpy_version: str):
    """ai_edge_litert absent, a stand-in tflite_runtime present (the lowest seam: the real
    fallback runs in its own venv below)."""
    import types

    fake = types.ModuleType("tflite_runtime.interpreter")
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", types.ModuleType("tflite_runtime"))
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake)
    monkeypatch.setattr(np, "__version__", numpy_version)
    return fake


def test_falls_back_to_tflite_runtime_when_litert_is_missing(monkeypatch):
    fake = _only_tflite_runtime(monkeypatch, "1.26.4")
    assert import_interpreter() == ("tflite_runtime", fake)


def test_tflite_runtime_with_numpy_2_is_refused_with_the_fix(monkeypatch):
    _only_tflite_runtime(monkeypatch, "2.4.6")
    with pytest.raises(BackendError) as caught:
        import_interpreter()
    assert "built for numpy 1.x and numpy 2.4.6 is installed (pip install 'numpy<2')" in str(
        caught.value
    )


def test_without_any_interpreter_the_error_says_what_to_install(monkeypatch):
    for name in ("ai_edge_litert", "tflite_runtime"):
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.setitem(sys.modules, f"{name}.interpreter", None)
    with pytest.raises(BackendError) as caught:
        import_interpreter()
    message = str(caught.value)
    assert "pip install 'edgepack[tflite]'" in message
    assert "ai_edge_litert: not installed" in message
    assert "tflite_runtime: not installed" in message


def test_environment_variable_picks_the_package(monkeypatch):
    monkeypatch.setenv(INTERPRETER_ENV, "tflite_runtime")
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(BackendError, match="tflite_runtime: not installed") as caught:
        import_interpreter()
    assert "ai_edge_litert" not in str(caught.value).split(";", 1)[1]


def test_unknown_package_name_is_refused(monkeypatch):
    monkeypatch.setenv(INTERPRETER_ENV, "tensorflow")
    with pytest.raises(BackendError, match="is not a TFLite interpreter package"):
        import_interpreter()


# -- the session -------------------------------------------------------------------------


def test_session_reads_the_signature(digits_tflite_example):
    session = TfliteSession(digits_tflite_example.model, 1)
    assert session.signature == "serving_default"
    assert [s.describe() for s in session.input_specs()] == ["image: float32[1, 1, 8, 8]"]
    assert [s.describe() for s in session.output_specs()] == ["logits: float32[1, 10]"]
    assert session.info()["interpreter"].startswith("ai_edge_litert 2.")


def test_xnnpack_on_and_off_agree(digits_tflite_example, images):
    """The profile's switch reaches the interpreter; both kernels give the same answer."""
    with_xnnpack = TfliteSession(digits_tflite_example.model, 2, xnnpack=True)
    without = TfliteSession(digits_tflite_example.model, 2, xnnpack=False)
    assert with_xnnpack.info()["xnnpack"] and not without.info()["xnnpack"]
    delegated = {op["op_name"] for op in with_xnnpack.interpreter._get_ops_details()}
    plain = {op["op_name"] for op in without.interpreter._get_ops_details()}
    assert "DELEGATE" in delegated
    assert "DELEGATE" not in plain
    assert_close_across_kernels(_logits(with_xnnpack.run, images), _logits(without.run, images))


def test_concurrent_callers_get_their_own_answers(digits_tflite_example, images):
    session = TfliteSession(digits_tflite_example.model, 1)
    expected = _logits(session.run, images)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            results[index] = np.concatenate(
                [session.run({"image": images[i : i + 1]})["logits"] for i in range(len(images))]
            )
        except BaseException as exc:  # a dead thread must fail the test, not vanish
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert not any(thread.is_alive() for thread in threads), "a worker did not return"
    assert errors == []
    assert sorted(results) == [0, 1, 2, 3]
    for result in results.values():
        np.testing.assert_array_equal(result, expected)


def test_outputs_are_copies_that_survive_the_next_call(digits_tflite_example, images):
    session = TfliteSession(digits_tflite_example.model, 1)
    first = session.run({"image": images[:1]})["logits"]
    kept = first.copy()
    session.run({"image": images[1:2]})
    np.testing.assert_array_equal(first, kept)


# -- the backend behind Runtime ------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"), [pytest.param(None, 4, id="manifest"), pytest.param(1, 1, id="1")]
)
def test_threads_come_from_the_manifest_unless_overridden(extracted, override, expected):
    model_dir, manifest = extracted
    if override is None:  # the manifest's count, capped at what this process may use
        expected = min(expected, usable_cpus().count)
    with create_backend("tflite") as backend:
        backend.load(model_dir, manifest, BackendOptions(threads=override))
        assert backend.info()["threads"] == expected
        assert backend.engine is not None


def test_run_after_close_raises_backend_error(extracted, images):
    model_dir, manifest = extracted
    backend = create_backend("tflite")
    backend.load(model_dir, manifest, BackendOptions())
    backend.close()
    with pytest.raises(BackendError, match="closed or was never loaded"):
        backend.run({"image": images[:1]})


def test_backend_refuses_a_truncated_model_before_the_interpreter(extracted, tmp_path):
    model_dir, manifest = extracted
    damaged = tmp_path / "model"
    damaged.mkdir()
    data = (model_dir / manifest.model.path).read_bytes()
    (damaged / "model.tflite").write_bytes(data[: len(data) // 3])
    with pytest.raises(BackendError, match="refusing to load model/model.tflite: .*truncated"):
        create_backend("tflite").load(tmp_path, manifest, BackendOptions())


@pytest.mark.parametrize(
    ("inputs", "phrase"),
    [
        pytest.param({}, "missing inputs ['image']", id="missing"),
        pytest.param(
            {"image": np.zeros((2, 1, 8, 8), np.float32)},
            "has size 2 on axis 0, needs 1",
            id="batch-2",
        ),
        pytest.param({"image": np.zeros((1, 1, 8, 8))}, "dtype float64, needs float32", id="f64"),
        pytest.param({"image": [[0.0]]}, "is a list, not a numpy array", id="list"),
    ],
)
def test_runtime_checks_inputs_as_for_onnx(tflite_x86_bundle, keypair, inputs, phrase):
    with (
        Runtime.open(tflite_x86_bundle, keypair[1]) as runtime,
        pytest.raises(InputSignatureError) as caught,
    ):
        runtime.run(inputs)
    assert phrase in str(caught.value)
    assert "expected image: float32[1, 1, 8, 8]" in str(caught.value)


# -- tflite_runtime, the fallback, in its own venv ----------------------------------------

RUN_BOTH = """
import json, sys
import numpy as np
from edge_runtime import Runtime
bundle, pubkey, eval_path = sys.argv[1:4]
with np.load(eval_path) as data:
    images = data["image"][:32]
with Runtime.open(bundle, pubkey) as runtime:
    report = runtime.selftest()
    logits = np.concatenate(
        [runtime.run({"image": images[i : i + 1]})["logits"] for i in range(len(images))]
    )
    print(json.dumps({"info": runtime.info(), "passed": report.passed,
                      "failures": report.failures, "numpy": np.__version__,
                      "logits": logits.tolist()}))
"""


@pytest.fixture(scope="module")
def legacy_python():
    python = ensure_tflite_runtime_venv()
    if python is None:
        pytest.skip("tflite-runtime has no wheel for this Python or platform")
    return python


@pytest.mark.slow
@pytest.mark.parametrize("bundle_fixture", ["tflite_pi4_bundle", "tflite_fp32_bundle"])
def test_tflite_runtime_runs_the_bundle_like_ai_edge_litert(
    request, legacy_python, bundle_fixture, keypair, digits_tflite_example
):
    bundle = request.getfixturevalue(bundle_fixture)
    done = run_in_venv(
        legacy_python, "-c", RUN_BOTH, str(bundle), str(keypair[1]), str(digits_tflite_example.eval)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["info"]["interpreter"] == "tflite_runtime 2.14.0"
    assert result["numpy"].startswith("1.")
    assert result["passed"], result["failures"]
    with np.load(digits_tflite_example.eval) as data:
        images = data["image"][:32]
    with Runtime.open(bundle, keypair[1]) as runtime:
        assert runtime.info()["interpreter"].startswith("ai_edge_litert")
        expected = _logits(runtime.run, images)
    legacy = np.array(result["logits"], dtype=np.float32)
    assert (legacy.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(legacy, expected, atol=0.05 * np.abs(expected).max())


@pytest.mark.slow
def test_tflite_runtime_cli_selftest_and_a_truncated_model(
    legacy_python, tflite_pi4_bundle, keypair, tmp_path
):
    """`edge-runtime selftest` under tflite_runtime; a truncated file gets an error, not
    the SIGSEGV tflite_runtime itself dies with."""
    done = run_in_venv(
        legacy_python,
        "-m",
        "edge_runtime.cli",
        "selftest",
        str(tflite_pi4_bundle),
        "--pubkey",
        str(keypair[1]),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS" in done.stdout

    with Runtime.open(tflite_pi4_bundle, keypair[1]) as runtime:
        data = (runtime.model_dir / "model/model.tflite").read_bytes()
    truncated = tmp_path / "cut.tflite"
    truncated.write_bytes(data[: len(data) // 2])
    probe = (
        "import sys\nfrom edge_runtime.backends.tflite import TfliteSession\n"
        "from edge_runtime.errors import EdgeRuntimeError\n"
        "try:\n    TfliteSession(__import__('pathlib').Path(sys.argv[1]))\n"
        "except EdgeRuntimeError as exc:\n    print('refused:', exc)\n"
    )
    refused = run_in_venv(legacy_python, "-c", probe, str(truncated))
    assert refused.returncode == 0, refused.stderr[-2000:]
    assert "refused:" in refused.stdout and "truncated" in refused.stdout

    # What the pre-check prevents: tflite_runtime loading the same file itself.
    raw = run_in_venv(
        legacy_python,
        "-c",
        "import sys\nfrom tflite_runtime.interpreter import Interpreter\n"
        "Interpreter(model_path=sys.argv[1]).allocate_tensors()\n",
        str(truncated),
    )
    assert raw.returncode != 0
