import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from packager.cli import cli
from packager.profiles import shipped_profile_names


def edgepack(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-c", "from packager.cli import main; main()", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_build_passes_a_validated_config_to_the_library(monkeypatch, tmp_path, digits_example):
    seen = {}

    def fake_build(config, progress):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr("packager.build.build_bundle", fake_build)
    CliRunner().invoke(
        cli,
        [
            "build",
            str(digits_example.model),
            "--profile",
            "raspberry-pi-5",
            "--key",
            "k.key",
            "-o",
            str(tmp_path / "o.edgepkg"),
            "--eval",
            str(digits_example.eval),
            "--max-degradation",
            "0.02",
            "--recipe",
            "fp16",
            "--no-measure",
            "--version",
            "2.0.0",
        ],
    )

    config = seen["config"]
    assert config.profile.name == "raspberry-pi-5"
    assert (config.recipe, config.max_degradation, config.measure) == ("fp16", 0.02, False)
    assert config.version == "2.0.0"
    assert config.calibration is None


def test_build_needs_exactly_one_profile_source(digits_example, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["build", str(digits_example.model), "--key", "k", "-o", "o", "--eval", "e.npz"],
    )

    assert result.exit_code == 2
    assert "exactly one of --profile NAME or --profile-file PATH" in result.output


def test_build_verify_inspect_end_to_end(digits_example, keypair, other_keypair, tmp_path):
    bundle = tmp_path / "cnn.edgepkg"

    built = edgepack(
        "build",
        str(digits_example.model),
        "--profile",
        "x86-64-avx2",
        "--key",
        str(keypair[0]),
        "-o",
        str(bundle),
        "--calibration",
        str(digits_example.calibration),
        "--eval",
        str(digits_example.eval),
    )
    assert built.returncode == 0, built.stderr
    assert "quantization attempts" in built.stderr
    assert "int8-static-qdq-per-channel" in built.stderr
    assert "p50" in built.stderr

    verified = edgepack("verify", str(bundle), "--pubkey", str(keypair[1]))
    assert verified.returncode == 0
    assert verified.stdout.startswith("OK:")

    wrong = edgepack("verify", str(bundle), "--pubkey", str(other_keypair[1]))
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("error: bundle signature does not verify")
    assert "Traceback" not in wrong.stderr

    manifest = json.loads(edgepack("inspect", str(bundle), "--json").stdout)
    assert manifest["quantization"]["chosen"] == "int8-static-qdq-per-channel"
    summary = edgepack("inspect", str(bundle)).stdout
    assert "image: float32[batch, 1, 8, 8]" in summary


def test_user_errors_are_one_red_line_and_debug_shows_the_traceback(digits_example, keypair):
    args = [
        "build",
        str(digits_example.model),
        "--profile",
        "pi4",
        "--key",
        str(keypair[0]),
        "-o",
        "x.edgepkg",
        "--eval",
        str(digits_example.eval),
    ]

    plain = edgepack(*args)
    debug = edgepack("--debug", *args)

    assert plain.returncode == 1
    assert plain.stderr.strip().splitlines() == [
        "error: profile 'pi4' not found; known profiles: "
        + ", ".join(shipped_profile_names())
        + " (see `edgepack profiles list`, or pass your own with --profile-file)"
    ]
    assert "Traceback" in debug.stderr


def test_profiles_list_and_show():
    listed = CliRunner().invoke(cli, ["profiles", "list"])
    shown = CliRunner().invoke(cli, ["profiles", "show", "jetson-agx-orin"])

    assert listed.exit_code == 0
    for name in shipped_profile_names():
        assert name in listed.output
    profile = json.loads(shown.output)
    assert profile["onnx"]["providers"][0] == "TensorrtExecutionProvider"


@pytest.mark.parametrize("force, code", [(False, 1), (True, 0)])
def test_keygen_twice(tmp_path, force, code):
    assert edgepack("keygen", "--out", str(tmp_path)).returncode == 0

    again = edgepack("keygen", "--out", str(tmp_path), *(["--force"] if force else []))

    assert again.returncode == code


def test_profiles_show_needs_exactly_one_source(tmp_path):
    neither = CliRunner().invoke(cli, ["profiles", "show"])

    assert neither.exit_code == 2
    assert "exactly one of NAME or --profile-file" in neither.output
