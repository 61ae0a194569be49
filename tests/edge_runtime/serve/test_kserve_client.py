"""KServe's own Python client (the `kserve` package's InferenceRESTClient, protocol v2)
against a real `edge-runtime serve` process: live, ready, model ready and infer.

kserve 0.21 pins protobuf below 7, and the gRPC stubs here need protobuf 7, so the
client runs from a virtual environment of its own, made once under the test cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.runtime import Runtime

KSERVE = "kserve==0.21.0"

CLIENT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceRESTClient, RESTConfig
from kserve.protocol.infer_type import InferInput, InferRequest

url, model, name = sys.argv[1], sys.argv[2], sys.argv[3]
images = np.load(sys.argv[4])

async def main():
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    answers = {
        "live": await client.is_server_live(url),
        "ready": await client.is_server_ready(url),
        "model_ready": await client.is_model_ready(url, model),
    }
    tensor = InferInput(name, list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=False)
    request = InferRequest(model_name=model, infer_inputs=[tensor])
    result = await client.infer(url, request, model_name=model)
    output = result.outputs[0]
    answers["output"] = output.name
    answers["values"] = np.asarray(output.data, dtype=np.float64).reshape(output.shape).tolist()
    await client.close()
    print(json.dumps(answers))

asyncio.run(main())
"""


@pytest.fixture(scope="session")
def kserve_python(model_cache) -> Path:
    """The python of a venv holding kserve, made once (about a minute from PyPI)."""
    venv = model_cache.parent / "kserve-venv"
    python = venv / "bin" / "python"
    stamp = venv / f".{KSERVE}"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", KSERVE],
            check=True,
            timeout=900,
        )
        stamp.touch()
    return python


def test_kserve_rest_client_live_ready_and_infer(
    serve, cnn_bundle, keypair, digits_example, kserve_python, tmp_path
):
    served = serve(f"digits={cnn_bundle}", "--pubkey", keypair[1])
    with np.load(digits_example.eval) as data:
        images = data["image"][:3].astype(np.float32)
    np.save(tmp_path / "images.npy", images)

    completed = subprocess.run(
        [
            str(kserve_python),
            "-c",
            CLIENT,
            served.url,
            "digits",
            "image",
            str(tmp_path / "images.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ""},
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    answers = json.loads(completed.stdout.strip().splitlines()[-1])
    assert (answers["live"], answers["ready"], answers["model_ready"]) == (True, True, True)
    with Runtime.open(cnn_bundle, keypair[1]) as runtime:
        expected = runtime.run({"image": images})
    assert answers["output"] in expected
    np.testing.assert_allclose(
        np.array(answers["values"]), expected[answers["output"]], rtol=1e-5, atol=1e-5
    )
