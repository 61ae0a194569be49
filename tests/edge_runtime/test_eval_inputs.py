"""``edge-runtime run --input EVAL.npz`` on the build's own eval files (eval_inputs.py).

The digits eval file holds ``image`` [540, 1, 8, 8] and ``labels`` [540]. The ONNX CNN
takes a free batch; the TFLite conversion takes exactly [1, 1, 8, 8], so its samples are
fed one at a time. Both are checked against the labels, independently of the runtime.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_runtime.cli import cli
from edge_runtime.errors import InputSignatureError
from edge_runtime.eval_inputs import feeds_one_by_one, run_samples, split_inputs
from edge_runtime.runtime import Runtime
from tests.edge_runtime.hostile import without_thread_note

IGNORED_NOTE = "note: ignoring arrays that are not model inputs: labels"


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def invoke_run(bundle: Path, pubkey: Path, input_path: Path, output: Path):
    return CliRunner().invoke(
        cli,
        ["run", str(bundle), "--pubkey", str(pubkey)]
        + ["--input", str(input_path), "--output", str(output)],
    )


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def test_run_ignores_the_labels_of_the_builds_eval_file(
    cnn_bundle, keypair, digits_example, tmp_path
):
    output = tmp_path / "out.npz"
    eval_arrays = load(digits_example.eval)
    assert set(eval_arrays) == {"image", "labels"}

    result = invoke_run(cnn_bundle, keypair[1], digits_example.eval, output)

    assert result.exit_code == 0, result.output
    assert without_thread_note(result.stderr) == IGNORED_NOTE + "\n"
    assert result.stdout == f"wrote {output}: logits[540, 10]\n"
    logits = load(output)["logits"]
    with Runtime.open(cnn_bundle, keypair[1]) as runtime:
        direct = runtime.run({"image": eval_arrays["image"]})["logits"]
    np.testing.assert_allclose(logits, direct, rtol=1e-5, atol=1e-5)
    assert accuracy(logits, eval_arrays["labels"]) >= 0.9


def test_run_feeds_a_batch1_model_one_sample_at_a_time(
    tflite_pi4_bundle, keypair, digits_tflite_example, tmp_path
):
    output = tmp_path / "out.npz"
    eval_arrays = load(digits_tflite_example.eval)
    images = eval_arrays["image"]

    result = invoke_run(tflite_pi4_bundle, keypair[1], digits_tflite_example.eval, output)

    assert result.exit_code == 0, result.output
    assert without_thread_note(result.stderr).splitlines() == [
        IGNORED_NOTE,
        f"note: the model takes batch 1; ran {len(images)} samples one at a time",
    ]
    assert result.stdout == f"wrote {output}: logits[{len(images)}, 10]\n"
    logits = load(output)["logits"]
    assert logits.shape == (len(images), 10)
    assert accuracy(logits, eval_arrays["labels"]) >= 0.9
    with Runtime.open(tflite_pi4_bundle, keypair[1]) as runtime:
        assert runtime.manifest.inputs[0].shape == [1, 1, 8, 8]
        for index in (0, 17, len(images) - 1):
            row = runtime.run({"image": images[index : index + 1]})["logits"]
            np.testing.assert_array_equal(logits[index : index + 1], row)
        # Runtime.run itself still takes exactly the model's signature.
        with pytest.raises(InputSignatureError, match="has size 540 on axis 0, needs 1"):
            runtime.run({"image": images})


@pytest.mark.parametrize(
    ("arrays", "phrase"),
    [
        pytest.param(
            {"labels": np.zeros(3, np.int64)},
            "missing inputs ['image'], unknown inputs ['labels']; "
            "expected image: float32[1, 1, 8, 8]",
            id="missing-input",
        ),
        pytest.param(
            {"img": np.zeros((3, 1, 8, 8), np.float32), "labels": np.zeros(3, np.int64)},
            "missing inputs ['image'], unknown inputs ['img', 'labels']",
            id="misspelt-input",
        ),
        pytest.param(
            {"image": np.zeros((3, 1, 8, 8), np.float64), "labels": np.zeros(3, np.int64)},
            "input 'image' has dtype float64, needs float32; expected image: float32[1, 1, 8, 8]",
            id="wrong-dtype",
        ),
        pytest.param(
            {"image": np.zeros((3, 1, 8, 9), np.float32)},
            "input 'image' has size 9 on axis 3, needs 8; expected image: float32[1, 1, 8, 8]",
            id="wrong-fixed-size",
        ),
        pytest.param(
            {"image": np.zeros((3, 8, 8), np.float32)},
            "input 'image' has rank 3 (shape [3, 8, 8]), needs rank 4",
            id="wrong-rank",
        ),
        pytest.param(
            {"image": np.zeros((0, 1, 8, 8), np.float32)},
            "input 'image' has size 0 on axis 0, needs 1",
            id="no-samples",
        ),
    ],
)
def test_run_still_refuses_wrong_inputs_of_a_batch1_model(
    tflite_pi4_bundle, keypair, arrays, phrase, tmp_path
):
    input_path = tmp_path / "bad.npz"
    np.savez(input_path, **arrays)
    output = tmp_path / "out.npz"

    result = invoke_run(tflite_pi4_bundle, keypair[1], input_path, output)

    assert isinstance(result.exception, InputSignatureError)
    assert phrase in str(result.exception)
    assert "note:" not in without_thread_note(result.stderr)
    assert not output.exists()


def test_run_samples_reports_what_it_did(tflite_pi4_bundle, cnn_bundle, keypair):
    images = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    with Runtime.open(tflite_pi4_bundle, keypair[1]) as runtime:
        done = run_samples(runtime, {"image": images, "labels": np.arange(5)})
        single = run_samples(runtime, {"image": images[:1]})
    assert (done.ignored, done.one_by_one, done.samples) == (["labels"], True, 5)
    assert done.outputs["logits"].shape == (5, 10)
    assert (single.ignored, single.one_by_one, single.samples) == ([], False, 1)
    np.testing.assert_array_equal(single.outputs["logits"], done.outputs["logits"][:1])
    with Runtime.open(cnn_bundle, keypair[1]) as runtime:
        batched = run_samples(runtime, {"image": images})
    # A model with a free batch axis gets the whole batch in one call.
    assert (batched.ignored, batched.one_by_one, batched.samples) == ([], False, 5)
    assert batched.outputs["logits"].shape == (5, 10)


def test_split_and_batch_rules_on_the_manifest_signature(tflite_pi4_bundle, cnn_bundle, keypair):
    with Runtime.open(tflite_pi4_bundle, keypair[1]) as runtime:
        specs = runtime.manifest.inputs
    images = np.zeros((4, 1, 8, 8), np.float32)
    assert split_inputs(specs, {"image": images, "labels": np.zeros(4)}) == (
        {"image": images},
        ["labels"],
    )
    kept, ignored = split_inputs(specs, {"images": images})
    assert (list(kept), ignored) == (["images"], [])
    assert feeds_one_by_one(specs, {"image": images}) == 4
    assert feeds_one_by_one(specs, {"image": images[:1]}) is None
    assert feeds_one_by_one(specs, {"image": images[0]}) is None  # wrong rank: refused later
    with Runtime.open(cnn_bundle, keypair[1]) as runtime:
        assert feeds_one_by_one(runtime.manifest.inputs, {"image": images}) is None


def test_subprocess_run_on_the_eval_file_keeps_stdout_for_the_result(
    cnn_bundle, keypair, digits_example, tmp_path
):
    script = Path(sys.executable).with_name("edge-runtime")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "edge_runtime.cli"]
    output = tmp_path / "out.npz"
    completed = subprocess.run(
        [*command, "run", str(cnn_bundle), "--pubkey", str(keypair[1])]
        + ["--input", str(digits_example.eval), "--output", str(output)],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")},
        timeout=300,
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == f"wrote {output}: logits[540, 10]\n"
    assert without_thread_note(completed.stderr) == IGNORED_NOTE + "\n"
