from pathlib import Path

import pytest

from packager.errors import IncompatiblePassError, PackagerError
from packager.passes import PASSES, ModelArtifact, Pass, PassConfig, PassContext, PassOutput
from packager.passes.base import PassFailedError
from packager.profiles import load_profile
from packager.recipes import resolve_chain

EXPECTED = {
    "OnnxValidate",
    "OnnxGraphOptimize",
    "OnnxDynamicQuantize",
    "OnnxStaticQuantize",
    "OnnxToFloat16",
    "Evaluate",
    "Measure",
    "Package",
}


def test_every_pass_registers_itself_with_a_described_config():
    assert set(PASSES) >= EXPECTED
    for pass_class in PASSES.values():
        for name, field in pass_class.Config.model_fields.items():
            assert field.description, f"{pass_class.name}.{name} has no description"


def test_unknown_config_keys_are_rejected():
    with pytest.raises(PackagerError, match="per_chanel"):
        PASSES["OnnxDynamicQuantize"]({"per_chanel": True})


def test_impossible_profile_and_pass_pair_is_refused_before_running(tmp_path):
    # A GPU-only profile cannot run dynamic int8 (CPU-only kernels).
    data = load_profile("jetson-orin-nano").model_dump(mode="json")
    data["onnx"]["providers"] = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    profile = load_profile("jetson-orin-nano").model_validate(data)

    with pytest.raises(IncompatiblePassError, match="OnnxDynamicQuantize"):
        resolve_chain(profile, "int8-dynamic-per-channel", "onnx")
    assert [r.name for r in resolve_chain(profile, None, "onnx")] == ["fp16", "fp32"]


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(PackagerError, match="known onnx recipes: int8-static-qdq-per-channel"):
        resolve_chain(load_profile("raspberry-pi-4"), "int4", "onnx")


class _Exploding(Pass):
    name = "TestExploding"
    Config = PassConfig
    error: Exception = RuntimeError("engine says no")

    def _run(self, model, out_dir, ctx):
        raise self.error


def _ctx(tmp_path: Path) -> PassContext:
    return PassContext(workdir=tmp_path, profile=load_profile("x86-64-avx2"))


def test_engine_failures_become_pass_failed(tmp_path):
    with pytest.raises(PassFailedError, match="engine says no"):
        _Exploding().run(ModelArtifact(tmp_path / "m.onnx", "onnx"), _ctx(tmp_path))


def test_programming_errors_are_never_swallowed(tmp_path):
    exploding = _Exploding()
    exploding.error = TypeError("bug")
    with pytest.raises(TypeError):
        exploding.run(ModelArtifact(tmp_path / "m.onnx", "onnx"), _ctx(tmp_path))


class _Copy(Pass):
    name = "TestCopy"

    def _run(self, model, out_dir, ctx):
        output = out_dir / "copy.onnx"
        output.write_bytes(model.path.read_bytes())
        return PassOutput(ModelArtifact(output, "onnx"))


def test_base_run_owns_folder_timing_and_hash(tmp_path):
    source = tmp_path / "m.onnx"
    source.write_bytes(b"abc")
    ctx = _ctx(tmp_path / "work")

    output, record = _Copy().run(ModelArtifact(source, "onnx"), ctx)

    assert output.artifact.path.parent.name == "01-TestCopy"
    assert record.output_sha256 == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert record.seconds >= 0
