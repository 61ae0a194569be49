from pathlib import Path

import pytest

from packager.errors import IncompatiblePassError, PackagerError
from packager.passes import PASSES, ModelArtifact, Pass, PassConfig, PassContext, PassOutput
from packager.passes.base import PassFailedError
from packager.profiles import load_profile

EXPECTED = {
    "OnnxValidate",
    "OnnxGraphOptimize",
    "OnnxOpsetUpgrade",
    "OnnxMixedPrecisionQuantize",
    "OnnxDynamicQuantize",
    "OnnxStaticQuantize",
    "OnnxToFloat16",
    "OnnxInt8Weights",
    "OnnxFloat16Weights",
    "TfliteValidate",
    "TfliteQuantize",
    "TfliteNormalize",
    "TfliteDequantizeFp16",
    "TfliteFuseActivations",
    "GgufValidate",
    "GgufQuantize",
    "GgufEvaluate",
    "GgufMeasure",
    "Evaluate",
    "Measure",
    "Package",
}


def test_every_pass_registers_itself_with_a_described_config():
    assert set(PASSES) == EXPECTED
    for pass_class in PASSES.values():
        for name, field in pass_class.Config.model_fields.items():
            assert field.description, f"{pass_class.name}.{name} has no description"


def test_unknown_config_keys_are_rejected():
    with pytest.raises(PackagerError, match="per_chanel"):
        PASSES["OnnxDynamicQuantize"]({"per_chanel": True})


def test_a_gpu_only_profile_refuses_cpu_only_int8():
    # MatMulInteger has fast kernels only on the CPU provider.
    data = load_profile("jetson-orin-nano").model_dump(mode="json")
    data["onnx"]["providers"] = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    profile = load_profile("jetson-orin-nano").model_validate(data)

    with pytest.raises(IncompatiblePassError, match="OnnxDynamicQuantize") as error:
        PASSES["OnnxDynamicQuantize"].check_compatible(profile, "onnx")

    assert "pick another --recipe or add a provider" in str(error.value)
    PASSES["OnnxStaticQuantize"].check_compatible(profile, "onnx")  # QDQ runs on TensorRT


@pytest.mark.parametrize(
    "pass_name, model_format",
    [("OnnxToFloat16", "tflite"), ("TfliteQuantize", "onnx"), ("Evaluate", "gguf")],
)
def test_a_pass_refuses_formats_it_does_not_take(pass_name, model_format):
    with pytest.raises(IncompatiblePassError, match=f"pass {pass_name} takes"):
        PASSES[pass_name].check_compatible(load_profile("x86-64-avx2"), model_format)


def test_package_declares_every_format_it_packages():
    assert PASSES["Package"].input_formats == {"onnx", "tflite", "gguf"}


@pytest.fixture
def test_pass():
    """Register a pass for one test only: the registry is global, so it is emptied after."""
    registered = []

    def register(run, name):
        cls = type(name, (Pass,), {"name": name, "Config": PassConfig, "_run": run})
        registered.append(name)
        return cls

    yield register
    for name in registered:
        PASSES.pop(name, None)
    assert not set(registered) & set(PASSES)


def _ctx(tmp_path: Path) -> PassContext:
    return PassContext(workdir=tmp_path, profile=load_profile("x86-64-avx2"))


def _raising(error: Exception):
    def run(self, model, out_dir, ctx):
        raise error

    return run


def test_engine_failures_become_pass_failed(tmp_path, test_pass):
    exploding = test_pass(_raising(RuntimeError("engine says no")), "TestExploding")

    with pytest.raises(PassFailedError, match="TestExploding failed: RuntimeError: engine says no"):
        exploding().run(ModelArtifact(tmp_path / "m.onnx", "onnx"), _ctx(tmp_path))


def test_programming_errors_are_never_swallowed(tmp_path, test_pass):
    buggy = test_pass(_raising(TypeError("bug")), "TestBuggy")

    with pytest.raises(TypeError):
        buggy().run(ModelArtifact(tmp_path / "m.onnx", "onnx"), _ctx(tmp_path))


def test_a_name_is_registered_once(test_pass):
    test_pass(_raising(RuntimeError()), "TestTwice")

    with pytest.raises(RuntimeError, match="two passes registered as 'TestTwice'"):
        type("TestTwice", (Pass,), {"name": "TestTwice", "_run": _raising(RuntimeError())})


def _copy(self, model, out_dir, ctx):
    output = out_dir / "copy.onnx"
    output.write_bytes(model.path.read_bytes())
    return PassOutput(ModelArtifact(output, "onnx"))


def test_base_run_owns_folder_timing_and_record(tmp_path, test_pass):
    source = tmp_path / "m.onnx"
    source.write_bytes(b"abc")
    ctx = _ctx(tmp_path / "work")
    copy = test_pass(_copy, "TestCopy")

    output, record = copy().run(ModelArtifact(source, "onnx"), ctx)
    digests: dict[Path, str] = {}
    step = record.step(digests)

    assert output.artifact.path.parent.name == "01-TestCopy"
    assert record.output == output.artifact.path
    assert step.output_sha256 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert digests == {output.artifact.path: step.output_sha256}  # the bundle reuses it
    assert (step.name, step.config, step.seconds >= 0) == ("TestCopy", {}, True)
    assert record.step(digests, timed=False).seconds == 0.0


def test_a_pass_that_writes_nothing_records_no_hash(tmp_path, test_pass):
    source = tmp_path / "m.onnx"
    source.write_bytes(b"abc")
    examine = test_pass(lambda self, model, out_dir, ctx: PassOutput(model), "TestExamine")

    _, record = examine().run(ModelArtifact(source, "onnx"), _ctx(tmp_path / "work"))

    assert record.output is None and record.step({}).output_sha256 is None
