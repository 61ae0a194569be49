"""The Jetson bundle on a real NVIDIA GPU with the CUDA execution provider (fp16).

Skips on machines without onnxruntime-gpu and a CUDA device; run it on one with
`scripts/test.sh -m gpu` after `pip install onnxruntime-gpu`.
"""

import pytest

from edge_runtime import Runtime
from tests.conftest import build_example

pytestmark = pytest.mark.gpu


def _cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not _cuda_available(), reason="needs onnxruntime-gpu and an NVIDIA GPU")
def test_jetson_bundle_runs_fp16_on_cuda(minilm_example, keypair, tmp_path):
    result = build_example(minilm_example, keypair[0], tmp_path / "j.edgepkg", "jetson-orin-nano")

    with Runtime.open(
        result.bundle, keypair[1], providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    ) as runtime:
        providers = runtime.info()["providers"]
        report = runtime.selftest()

    assert result.manifest.model.recipe == "fp16"
    assert providers[0] == "CUDAExecutionProvider"
    assert report.passed, report.failures
