"""The build engine (packager/pipeline.py): what it refuses before any work, and the
step history it writes into the manifest."""

from __future__ import annotations

import ast
import dataclasses
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.bundle import verify_bundle
from packager import pipeline
from packager.build import BuildConfig, build_bundle
from packager.errors import IncompatiblePassError, PackagerError
from packager.formats import formats, get_format
from packager.formats.base import Step
from packager.profiles import load_profile
from tests.conftest import build_example

REPO = Path(__file__).resolve().parents[2]


def _config(example, keypair, tmp_path, **options) -> BuildConfig:
    fields = {
        "model": example.model,
        "profile": load_profile(options.pop("profile", "x86-64-avx2")),
        "key": keypair[0],
        "output": tmp_path / "b.edgepkg",
        "calibration": example.calibration,
        "eval": example.eval,
        "measure": False,
        "workdir": tmp_path / "work",
    }
    return BuildConfig(**{**fields, **options})


def _refused_before_any_work(config: BuildConfig, error: type[Exception], match: str) -> str:
    progress: list[str] = []
    with pytest.raises(error, match=match) as caught:
        build_bundle(config, progress.append)
    assert progress == []  # no pass announced itself ...
    assert not config.workdir.exists()  # ... and none had a folder to write in
    assert not config.output.exists()
    return str(caught.value)


def test_an_unknown_recipe_is_refused_before_any_work(digits_example, keypair, tmp_path):
    config = _config(digits_example, keypair, tmp_path, recipe="int4")

    message = _refused_before_any_work(config, PackagerError, "unknown onnx recipe 'int4'")

    assert "known onnx recipes: int8-static-qdq-per-channel" in message


def test_a_pass_the_profile_cannot_run_is_refused_before_any_work(
    digits_example, keypair, tmp_path
):
    data = load_profile("jetson-orin-nano").model_dump(mode="json")
    data["onnx"]["providers"] = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    profile_file = tmp_path / "gpu-only.yaml"
    profile_file.write_text(yaml.safe_dump(data))
    config = _config(
        digits_example,
        keypair,
        tmp_path,
        profile="x86-64-avx2",
        recipe="int8-dynamic-per-channel",
    ).model_copy(update={"profile": load_profile(path=profile_file)})

    _refused_before_any_work(config, IncompatiblePassError, "pass OnnxDynamicQuantize produces")


def test_every_step_is_checked_not_only_recipe_steps(
    digits_example, keypair, tmp_path, monkeypatch
):
    # A prepare step whose pass does not take the format: the engine refuses the plan.
    onnx_format = get_format("onnx")
    broken = dataclasses.replace(onnx_format, prepare=(Step("GgufValidate"),))
    monkeypatch.setattr(pipeline, "detect_format", lambda model: broken)
    config = _config(digits_example, keypair, tmp_path)

    _refused_before_any_work(config, IncompatiblePassError, r"pass GgufValidate takes \['gguf'\]")


def test_a_bad_gate_config_is_refused_before_any_work(
    digits_example, keypair, tmp_path, monkeypatch
):
    onnx_format = get_format("onnx")
    gate = dataclasses.replace(onnx_format.gate, step=Step("Evaluate", {"max_degradaton": 1}))
    monkeypatch.setattr(
        pipeline, "detect_format", lambda model: dataclasses.replace(onnx_format, gate=gate)
    )
    config = _config(digits_example, keypair, tmp_path)

    _refused_before_any_work(config, PackagerError, "invalid config for pass Evaluate")


def test_missing_eval_data_is_refused_before_any_work(digits_example, keypair, tmp_path):
    config = _config(digits_example, keypair, tmp_path, eval=None)

    _refused_before_any_work(config, PackagerError, "an ONNX build needs --eval FILE.npz")


def test_a_bad_key_is_refused_before_any_work(digits_example, keypair, tmp_path):
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("not a key")
    config = _config(digits_example, keypair, tmp_path, key=bad_key)

    _refused_before_any_work(config, PackagerError, "bad.key")


def test_the_manifest_keeps_the_steps_behind_the_onnx_model(digits_example, keypair, tmp_path):
    result = build_example(digits_example, keypair[0], tmp_path / "b.edgepkg", "raspberry-pi-4")

    manifest = result.manifest
    steps = manifest.steps
    assert [step.name for step in steps] == [
        "OnnxValidate",
        "OnnxGraphOptimize",
        "OnnxStaticQuantize",
    ]
    assert steps[0].output_sha256 is None  # validation writes no model
    assert steps[1].config == {"level": "basic"}
    assert steps[2].config["per_channel"] is True
    model_entry = next(entry for entry in manifest.files if entry.path == "model/model.onnx")
    assert steps[2].output_sha256 == model_entry.sha256
    assert all(step.seconds == 0.0 for step in steps)  # --no-measure: reproducible bytes
    verify_bundle(result.bundle, keypair[1])


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, relative imports resolved against ``package``."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            imported.add(module)
            imported.update(f"{module}.{alias.name}" for alias in node.names)
    return imported


def test_format_modules_do_not_import_one_another():
    names = set(formats())
    assert names == {"onnx", "tflite", "gguf"}
    for name in names:
        imported = _imported_modules(
            REPO / "packager" / "formats" / f"{name}.py", "packager.formats"
        )
        others = {f"packager.formats.{other}" for other in names - {name}}
        assert not imported & others, f"formats/{name}.py imports {imported & others}"
        # nor anything above them: the profile schema is built from these modules
        above = {"packager.passes", "packager.pipeline", "packager.profiles", "packager.build"}
        assert not {m for m in imported if m.split(".")[:2] == ["packager", "passes"]}
        assert not imported & above


def _extreme_weights_model(path: Path) -> None:
    """y = x @ W with weights float16 cannot hold: tiny, huge and ordinary values."""
    weights = np.ones((4, 2), dtype=np.float32)
    weights[0, 0], weights[1, 0], weights[2, 1], weights[3, 1] = 1e-12, 2e5, -3e-11, -1e6
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "extreme",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_fp16_prints_one_line_for_the_clamped_weights(keypair, tmp_path, capfd):
    model = tmp_path / "extreme.onnx"
    _extreme_weights_model(model)
    eval_data = tmp_path / "eval.npz"
    np.savez(eval_data, x=np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32))
    config = BuildConfig(
        model=model,
        profile=load_profile("x86-64-avx2"),
        key=keypair[0],
        output=tmp_path / "b.edgepkg",
        eval=eval_data,
        recipe="fp16",
        max_degradation=1.0,
        measure=False,
    )
    progress: list[str] = []

    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        build_bundle(config, progress.append)

    streams = capfd.readouterr()
    assert "will be truncated" not in streams.err + streams.out
    assert not [w for w in leaked if "truncated" in str(w.message)]
    assert not [line for line in progress if "truncated" in line]
    summaries = [line for line in progress if "clamped" in line]
    assert summaries == [
        "fp16: 4 float32 weights were clamped into the range float16 holds; "
        "the worst: 1e-12 -> 1e-07"
    ]
