"""Tests for edge_runtime/backends/onnx.py: provider fallback, session options, errors."""

from __future__ import annotations

import logging
import shutil
import sys

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime.backends import BackendOptions, create_backend
from edge_runtime.backends.onnx import OnnxBackend, choose_providers
from edge_runtime.bundle import extract_bundle, verify_bundle
from edge_runtime.cpus import usable_cpus
from edge_runtime.errors import BackendError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
COREML = "CoreMLExecutionProvider"


@pytest.fixture(scope="module")
def extracted(cnn_bundle, keypair, tmp_path_factory):
    """The real CNN bundle, verified and extracted once: (model folder, manifest)."""
    verified = verify_bundle(cnn_bundle, keypair[1])
    return extract_bundle(verified, tmp_path_factory.mktemp("extracted")), verified.manifest


@pytest.fixture
def sessions(monkeypatch):
    """Record every real ``InferenceSession`` the backend creates."""
    created: list[ort.InferenceSession] = []
    real = ort.InferenceSession

    def recording(*args, **kwargs):
        session = real(*args, **kwargs)
        created.append(session)
        return session

    monkeypatch.setattr(ort, "InferenceSession", recording)
    return created


def with_backend(manifest, **changes):
    return manifest.model_copy(update={"backend": manifest.backend.model_copy(update=changes)})


@pytest.mark.parametrize(
    ("wanted", "available", "chosen", "warnings"),
    [
        pytest.param([CPU], [CPU], [CPU], [], id="cpu-only"),
        pytest.param([CUDA, CPU], [CUDA, CPU], [CUDA, CPU], [], id="all-present"),
        pytest.param(
            [CUDA, CPU],
            ["AzureExecutionProvider", CPU],
            [CPU],
            [f"execution provider {CUDA} is not available here; falling back to {CPU}"],
            id="no-cuda",
        ),
        pytest.param(
            [CUDA],
            [CPU],
            [CPU],
            [f"execution provider {CUDA} is not available here; falling back to {CPU}"],
            id="cpu-appended",
        ),
        pytest.param(
            [TENSORRT, CUDA, CPU],
            [CUDA, CPU],
            [CUDA, CPU],
            [f"execution provider {TENSORRT} is not available here; falling back to {CUDA}"],
            id="tensorrt-to-cuda",
        ),
        pytest.param(
            [TENSORRT, CUDA],
            [CPU],
            [CPU],
            [
                f"execution provider {TENSORRT} is not available here; falling back to {CPU}",
                f"execution provider {CUDA} is not available here; falling back to {CPU}",
            ],
            id="two-missing",
        ),
        pytest.param(
            [COREML],
            [],
            [CPU],
            [f"execution provider {COREML} is not available here; falling back to {CPU}"],
            id="nothing-available",
        ),
    ],
)
def test_choose_providers_keeps_what_exists_and_warns_on_each_gap(
    wanted, available, chosen, warnings, caplog
):
    caplog.set_level(logging.WARNING, logger="edge_runtime.backends.onnx")

    result = choose_providers(wanted, available)

    assert result == chosen
    assert result[-1] == CPU
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == warnings


@pytest.mark.parametrize("arena", [True, False])
def test_load_honours_the_cpu_memory_arena_flag(extracted, sessions, arena):
    model_dir, manifest = extracted

    with create_backend("onnx") as backend:
        backend.load(
            model_dir, with_backend(manifest, enable_cpu_mem_arena=arena), BackendOptions()
        )

    assert sessions[0].get_session_options().enable_cpu_mem_arena is arena


@pytest.mark.parametrize(("spinning", "entry"), [(True, ""), (False, "0")])
def test_edge_profiles_stop_idle_worker_threads_spinning(extracted, sessions, spinning, entry):
    model_dir, manifest = extracted

    with create_backend("onnx") as backend:
        backend.load(model_dir, with_backend(manifest, allow_spinning=spinning), BackendOptions())

    options = sessions[0].get_session_options()
    try:
        found = options.get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # never set: ONNX Runtime's default, which spins
        found = ""
    assert found == entry


@pytest.mark.parametrize(
    ("manifest_threads", "override", "expected"),
    [
        pytest.param(4, None, 4, id="manifest"),
        pytest.param(1, None, 1, id="manifest-1"),
        pytest.param(4, 1, 1, id="override"),
        pytest.param(2, 3, 3, id="override-up"),
    ],
)
def test_load_uses_the_manifest_threads_unless_overridden(
    extracted, sessions, manifest_threads, override, expected
):
    model_dir, manifest = extracted
    manifest = with_backend(manifest, intra_op_threads=manifest_threads)
    if override is None:  # the manifest's count, capped at what this process may use
        expected = min(expected, usable_cpus().count)

    with create_backend("onnx") as backend:
        backend.load(model_dir, manifest, BackendOptions(threads=override))
        info = backend.info()

    assert sessions[0].get_session_options().intra_op_num_threads == expected
    assert info["threads"] == expected


def test_missing_provider_override_falls_back_to_cpu_and_still_runs(extracted, caplog):
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA, so there is nothing to fall back from")
    model_dir, manifest = extracted
    caplog.set_level(logging.WARNING, logger="edge_runtime.backends.onnx")
    backend = OnnxBackend()

    backend.load(model_dir, manifest, BackendOptions(providers=[CUDA]))
    outputs = backend.run({"image": np.zeros((2, 1, 8, 8), dtype=np.float32)})

    assert backend.info()["providers"] == [CPU]
    assert outputs["logits"].shape == (2, 10)
    assert f"execution provider {CUDA} is not available here" in caplog.text


def test_run_after_close_raises_backend_error(extracted):
    model_dir, manifest = extracted
    backend = OnnxBackend()
    backend.load(model_dir, manifest, BackendOptions())

    backend.close()

    assert backend.info() == {"providers": []}
    with pytest.raises(BackendError, match="closed or was never loaded"):
        backend.run({"image": np.zeros((1, 1, 8, 8), dtype=np.float32)})


def test_corrupt_model_raises_backend_error(extracted, tmp_path):
    model_dir, manifest = extracted
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    (copy / manifest.model.path).write_bytes(b"this is not an onnx model")

    with pytest.raises(BackendError, match="ONNX Runtime could not load model/model.onnx"):
        OnnxBackend().load(copy, manifest, BackendOptions())


def test_missing_onnxruntime_raises_backend_error_with_the_fix(extracted, monkeypatch):
    model_dir, manifest = extracted
    monkeypatch.setitem(sys.modules, "onnxruntime", None)

    with pytest.raises(BackendError, match=r"pip install 'edgepack\[onnx\]'"):
        OnnxBackend().load(model_dir, manifest, BackendOptions())


def test_create_backend_returns_the_onnx_backend():
    backend = create_backend("onnx")

    assert isinstance(backend, OnnxBackend)
    assert backend.name == "onnx"
