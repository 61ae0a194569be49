import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_runtime.cli_options import SettingOption
from packager.cli import cli, main
from packager.errors import PackagerError
from packager.profiles import shipped_profile_names
from packager.settings import BuildConfig


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
    result = CliRunner().invoke(
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

    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert config.profile.name == "raspberry-pi-5"
    assert (config.recipe, config.max_degradation, config.measure) == ("fp16", 0.02, False)
    assert config.version == "2.0.0"
    assert config.calibration == []


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
        # An arm64 profile: on this x86 host the digits CNN's int8 is slower than float,
        # which the speed check refuses only for a profile of the host's own architecture.
        "--profile",
        "raspberry-pi-4",
        "--key",
        str(keypair[0]),
        "-o",
        str(bundle),
        "--calibration",
        str(digits_example.calibration),
        "--eval",
        str(digits_example.eval),
        # the digits CNN runs at 0.8-0.96x fp32 in int8 here: too small to gain
        "--no-speed-check",
    )
    assert built.returncode == 0, built.stderr
    assert "quantization attempts" in built.stderr
    assert "int8-static-qdq-per-channel" in built.stderr
    assert "p50" in built.stderr

    verified = edgepack("verify", str(bundle), "--pubkey", str(keypair[1]))
    assert verified.returncode == 0
    assert verified.stdout.startswith("OK:")
    verified_json = edgepack("--json", "verify", str(bundle), "--pubkey", str(keypair[1]))
    as_json = json.loads(verified_json.stdout)
    assert as_json["bundle"] == str(bundle)
    assert as_json["files"] > 0

    wrong = edgepack("verify", str(bundle), "--pubkey", str(other_keypair[1]))
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("error: bundle signature does not verify")
    assert "Traceback" not in wrong.stderr

    inspected = edgepack("inspect", str(bundle), "--json")
    assert inspected.returncode == 0, inspected.stderr
    manifest = json.loads(inspected.stdout)
    assert manifest["quantization"]["chosen"] == "int8-static-qdq-per-channel"
    assert json.loads(edgepack("--json", "inspect", str(bundle)).stdout) == manifest
    summary = edgepack("inspect", str(bundle))
    assert summary.returncode == 0, summary.stderr
    assert "image: float32[batch, 1, 8, 8]" in summary.stdout


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
    debug_after = edgepack(*args, "--debug")

    assert plain.returncode == 1
    assert debug.returncode == debug_after.returncode == 1
    assert plain.stderr.strip().splitlines() == [
        "error: profile 'pi4' not found; known profiles: "
        + ", ".join(shipped_profile_names())
        + " (see `edgepack profiles list`, or pass your own with --profile-file)"
    ]
    assert "Traceback" in debug.stderr
    assert "Traceback" in debug_after.stderr


def test_profiles_list_and_show():
    listed = CliRunner().invoke(cli, ["profiles", "list"])
    listed_json = CliRunner().invoke(cli, ["--json", "profiles", "list"])
    shown = CliRunner().invoke(cli, ["profiles", "show", "jetson-agx-orin"])

    assert listed.exit_code == listed_json.exit_code == shown.exit_code == 0
    for name in shipped_profile_names():
        assert name in listed.output
    assert [p["name"] for p in json.loads(listed_json.output)] == shipped_profile_names()
    profile = json.loads(shown.output)
    assert profile["onnx"]["providers"][0] == "TensorrtExecutionProvider"


@pytest.mark.parametrize("force, code", [(False, 1), (True, 0)])
def test_keygen_twice(tmp_path, force, code):
    assert edgepack("keygen", "-o", str(tmp_path)).returncode == 0

    again = edgepack("keygen", "--output", str(tmp_path), *(["--force"] if force else []))

    assert again.returncode == code


def test_keygen_still_takes_the_old_out_spelling_but_does_not_show_it(tmp_path):
    made = CliRunner().invoke(cli, ["keygen", "--out", str(tmp_path), "--json"])
    shown = CliRunner().invoke(cli, ["keygen", "--help"])

    assert made.exit_code == 0, made.output
    assert json.loads(made.output) == {
        "private_key": str(tmp_path / "edgepack.key"),
        "public_key": str(tmp_path / "edgepack.pub"),
    }
    assert "-o, --output PATH" in shown.output
    assert "--out " not in shown.output


@pytest.mark.parametrize("command", ["keygen", "freeze", "example"])
def test_the_output_flag_is_spelt_the_same_everywhere(command):
    shown = CliRunner().invoke(cli, [command, "--help"])

    assert shown.exit_code == 0
    assert "-o, --output" in shown.output


def test_profiles_show_needs_exactly_one_source(tmp_path):
    neither = CliRunner().invoke(cli, ["profiles", "show"])

    assert neither.exit_code == 2
    assert "exactly one of NAME or --profile-file" in neither.output


# --- the options generated from BuildConfig -----------------------------------------------

NOT_FLAGS = {"model": "the MODEL argument", "profile": "--profile NAME or --profile-file PATH"}
BASE = ["build", "m.onnx", "--profile", "raspberry-pi-5", "--key", "k.key", "-o", "o.edgepkg"]
# field -> (the flags a user types, the value BuildConfig then holds)
FLAG_VALUES = {
    "key": (["--key", "other.key"], Path("other.key")),
    "output": (["--output", "b.edgepkg"], Path("b.edgepkg")),
    "calibration": (
        ["--calibration", "c.npz", "--calibration", "c2.npz"],
        [Path("c.npz"), Path("c2.npz")],
    ),
    "eval": (["--eval", "e.npz"], [Path("e.npz")]),
    "max_degradation": (["--max-degradation", "0.25"], 0.25),
    "quant": (["--quant", "Q5_K_M"], "Q5_K_M"),
    "allow_requantize": (["--allow-requantize"], True),
    "max_ppl_increase": (["--max-ppl-increase", "0.3"], 0.3),
    "llm_window": (["--llm-window", "128"], 128),
    "selftest_tokens": (["--selftest-tokens", "8"], 8),
    "with_wheels": (["--with-wheels"], True),
    "extra_wheels": (["--extra-wheels", "wheels"], Path("wheels")),
    "recipe": (["--recipe", "fp16"], "fp16"),
    "measure": (["--no-measure"], False),
    "speed_check": (["--no-speed-check"], False),
    "task": (["--task", "embedding"], "embedding"),
    "metric": (
        ["--metric", "boxes=detection", "--metric", "prob=relative-error"],
        {"boxes": "detection", "prob": "relative-error"},
    ),
    "metric_plugin": (["--metric-plugin", "mine:score"], "mine:score"),
    "selftest_vectors": (["--selftest-vectors", "3"], 3),
    "name": (["--name", "tiny"], "tiny"),
    "version": (["--version", "3.1.4"], "3.1.4"),
    "workdir": (["--workdir", "scratch"], Path("scratch")),
    "batch_axis": (["--batch-axis", "state=1", "--batch-axis", "h=2"], {"state": 1, "h": 2}),
    "constant": (["--constant", "sr=16000"], {"sr": "16000"}),
    "state": (["--state", "state=stateN"], {"state": "stateN"}),
    "tokenizer": (["--tokenizer", "tokenizer.json"], Path("tokenizer.json")),
    "tokenizer_input": (["--tokenizer-input", "input_ids=ids"], {"input_ids": "ids"}),
    "text_max_length": (["--text-max-length", "256"], 256),
    "text_padding": (["--text-padding", "max_length"], "max_length"),
    "text_truncation": (["--no-text-truncation"], False),
    "text_output": (["--text-output", "last_hidden_state"], "last_hidden_state"),
    "pooling": (["--pooling", "cls"], "cls"),
}
# each numeric option: a value outside its range, how the error echoes it, the range
OUT_OF_RANGE = {
    "max_degradation": (["--max-degradation", "5"], "5.0", "0 <= x <= 1"),
    "max_ppl_increase": (["--max-ppl-increase", "-0.1"], "-0.1", "x >= 0"),
    "llm_window": (["--llm-window", "63"], "63", "x >= 64"),
    "selftest_tokens": (["--selftest-tokens", "257"], "257", "1 <= x <= 256"),
    "selftest_tokens-low": (["--selftest-tokens", "0"], "0", "1 <= x <= 256"),
    "text_max_length": (["--text-max-length", "0"], "0", "x >= 1"),
    "selftest_vectors": (["--selftest-vectors", "0"], "0", "x >= 1"),
}


@pytest.fixture
def built_config(monkeypatch):
    """Run ``edgepack build`` in process up to the library call; return the config."""
    seen = {}

    def fake_build(config, progress):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr("packager.build.build_bundle", fake_build)

    def invoke(*args: str):
        result = CliRunner().invoke(cli, [*BASE, *args])
        assert result.exit_code == 0, result.output
        return seen["config"]

    return invoke


def build_options() -> list[SettingOption]:
    return [p for p in cli.commands["build"].params if isinstance(p, SettingOption)]


def test_every_build_config_field_has_a_flag_whose_help_is_its_description():
    options = {option.field_name: option for option in build_options()}

    assert set(options) | set(NOT_FLAGS) == set(BuildConfig.model_fields)
    for name, option in options.items():
        assert option.help == BuildConfig.model_fields[name].description
    assert set(FLAG_VALUES) == set(options)  # every flag is exercised below


@pytest.mark.parametrize("field", sorted(FLAG_VALUES))
def test_each_build_flag_reaches_the_config(built_config, field):
    args, expected = FLAG_VALUES[field]

    config = built_config(*args)

    assert getattr(config, field) == expected
    assert getattr(BuildConfig.model_fields[field], "default", None) != expected


def test_build_flags_not_given_keep_the_config_defaults(built_config):
    config = built_config()

    for name, field in BuildConfig.model_fields.items():
        if name not in ("model", "profile", "key", "output"):
            assert getattr(config, name) == field.get_default(call_default_factory=True), name


@pytest.mark.parametrize(
    "args, message",
    [
        (["--metric", "boxes"], "--metric takes NAME=VALUE, got 'boxes'"),
        (["--constant", "=3"], "--constant takes NAME=VALUE, got '=3'"),
        (["--batch-axis", "a=1", "--batch-axis", "a=2"], "--batch-axis names 'a' twice"),
        (["--batch-axis", "state=first"], "--batch-axis"),
        (["--selftest-vectors", "0"], "x >= 1"),
    ],
)
def test_a_bad_repeatable_build_option_is_one_line_and_exit_2(args, message):
    result = CliRunner().invoke(cli, [*BASE, *args])

    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_every_numeric_build_option_has_an_out_of_range_case():
    numeric = {
        name
        for name, field in BuildConfig.model_fields.items()
        if field.annotation in (int, float, "int", "float", int | None, float | None)
    }

    assert numeric == {case.split("-")[0] for case in OUT_OF_RANGE}


@pytest.mark.parametrize("field", sorted(OUT_OF_RANGE))
def test_an_out_of_range_build_option_is_one_line_and_exit_2(field):
    args, echoed, allowed = OUT_OF_RANGE[field]

    result = CliRunner().invoke(cli, [*BASE, *args])

    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {args[0]} {echoed}: Input should be ")
    assert lines[0].endswith(f"(allowed: {allowed}); see --help for the allowed values")


def test_an_out_of_range_option_from_the_real_entry_point(tmp_path):
    done = edgepack(*BASE, "--max-degradation", "5")

    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: --max-degradation 5.0: Input should be less than or equal to 1 "
        "(allowed: 0 <= x <= 1); see --help for the allowed values"
    ]


def test_a_literal_debug_value_is_not_taken_for_the_option(monkeypatch, capsys):
    def fake_build(config, progress):
        raise PackagerError(f"stop here; name={config.name}")

    monkeypatch.setattr("packager.build.build_bundle", fake_build)
    monkeypatch.setattr(sys, "argv", ["edgepack", *BASE, "--name", "--debug"])

    with pytest.raises(SystemExit) as exit_:
        main()

    assert exit_.value.code == 1  # one line, not the traceback --debug would raise
    assert capsys.readouterr().err.strip() == "error: stop here; name=--debug"


def test_debug_is_shown_in_help():
    top = CliRunner().invoke(cli, ["--help"])
    build = CliRunner().invoke(cli, ["build", "--help"])

    assert top.exit_code == build.exit_code == 0
    for shown in (top.output, build.output):
        assert "--debug" in shown
        assert "-v, --verbose" in shown
        assert "--json" in shown
