from pathlib import Path

import pytest
import yaml

from packager.errors import ProfileError
from packager.profiles import DeviceProfile, load_all_profiles, load_profile, shipped_profile_names

REQUIRED = {
    "raspberry-pi-4",
    "raspberry-pi-5",
    "jetson-orin-nano",
    "jetson-agx-orin",
    "x86-64-avx2",
    "x86-64-avx512-vnni",
}


def test_every_required_profile_ships_and_validates():
    profiles = {profile.name: profile for profile in load_all_profiles()}

    assert set(profiles) >= REQUIRED
    for profile in profiles.values():
        assert profile.model_memory_budget_mb <= profile.ram_mb
        assert profile.onnx.providers[-1] == "CPUExecutionProvider"


def test_jetson_prefers_tensorrt_then_cuda_then_cpu_and_fp16():
    profile = load_profile("jetson-orin-nano")

    assert profile.onnx.providers == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert profile.onnx.recipes[0] == "fp16"
    assert profile.accelerator.value == "cuda"


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_edge_profiles_turn_the_cpu_arena_off(name):
    profile = load_profile(name)

    if profile.arch.value == "arm64":
        assert profile.onnx.cpu_mem_arena is False


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ProfileError) as error:
        load_profile("pi4")

    assert "profile 'pi4' not found" in str(error.value)
    assert "raspberry-pi-4" in str(error.value)
    assert "edgepack profiles list" in str(error.value)


def _profile_dict(name="raspberry-pi-4"):
    return load_profile(name).model_dump(mode="json")


def test_profile_file_is_loaded(tmp_path):
    data = _profile_dict()
    data["name"] = "my-board"
    path = tmp_path / "my-board.yaml"
    path.write_text(yaml.safe_dump(data))

    profile = load_profile(path=path)

    assert isinstance(profile, DeviceProfile)
    assert profile.name == "my-board"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d.update(coress=4), "coress: unknown key"),
        (lambda d: d["onnx"].update(thread=4), "onnx.thread: unknown key"),
        (lambda d: d.update(cores="many"), "cores"),
        (lambda d: d.pop("arch"), "arch"),
        (lambda d: d.update(arch="mips"), "arch"),
        (lambda d: d["gguf"].update(quant_types=["Q4_KM"]), "unknown llama.cpp quantization type"),
        (lambda d: d["gguf"].update(quant_types=[]), "gguf.quant_types"),
        (lambda d: d["gguf"].update(quant_type="Q4_K_M"), "gguf.quant_type: unknown key"),
        (
            lambda d: d["onnx"].update(recipes=["fp16", "int4"]),
            "onnx.recipes: Value error, unknown onnx recipe 'int4'; known: "
            "int8-static-qdq-per-channel",
        ),
        (
            lambda d: d["tflite"].update(recipes=["int4"]),
            "tflite.recipes: Value error, unknown tflite recipe 'int4'; known: int8-static",
        ),
    ],
)
def test_invalid_profile_names_the_key_and_the_file(tmp_path, mutate, expected):
    data = _profile_dict()
    mutate(data)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))

    with pytest.raises(ProfileError) as error:
        load_profile(path=path)

    assert str(path) in str(error.value)
    assert expected in str(error.value)


def test_missing_profile_file_and_bad_yaml(tmp_path):
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(path=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(path=bad)


def test_profiles_are_package_data():
    import device_profiles

    folder = Path(device_profiles.__file__).parent
    assert {path.stem for path in folder.glob("*.yaml")} == set(shipped_profile_names())
