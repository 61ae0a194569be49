"""Tests for edge_runtime/cli.py: ``edge-runtime run``, ``selftest`` and ``info``.

Most cases go through click's CliRunner on ``edge_runtime.cli.cli``, where a library
error arrives as ``result.exception``. The error boundary (``main``: one red line, exit
code 1) is checked in process, and end to end with real subprocesses.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_runtime.cli import cli, main
from edge_runtime.cpus import usable_cpus
from edge_runtime.errors import BundleError, InputSignatureError, SignatureError, TrustError
from edge_runtime.manifest import parse_manifest
from edge_runtime.runtime import Runtime
from edge_runtime.selftest import cosine_rows
from edge_runtime.signing import key_id, load_public_key

MODEL = "model/model.onnx"
VECTORS = "selftest/vectors.npz"
RED = "\x1b[31m"


@pytest.fixture(scope="module")
def bundle_files(cnn_bundle) -> dict[str, bytes]:
    with tarfile.open(cnn_bundle, mode="r:") as archive:
        return {info.name: archive.extractfile(info).read() for info in archive.getmembers()}


@pytest.fixture(scope="module")
def vectors(bundle_files) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(bundle_files[VECTORS]), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


@pytest.fixture
def tampered_bundle(bundle_files, tmp_path) -> Path:
    """The real bundle with one byte of the model flipped (the signature still verifies)."""
    path = tmp_path / "tampered.edgepkg"
    with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in bundle_files.items():
            if name == MODEL:
                data = data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def input_npz(vectors, tmp_path) -> Path:
    path = tmp_path / "in.npz"
    np.savez(path, image=vectors["input.image"])
    return path


def assert_matches_reference(outputs: dict[str, np.ndarray], vectors, bundle_files) -> None:
    tolerance = parse_manifest(bundle_files["manifest.json"]).selftest
    reference = vectors["reference.logits"]
    assert set(outputs) == {"logits"}
    assert outputs["logits"].shape == reference.shape
    assert np.max(np.abs(outputs["logits"] - reference)) <= tolerance.atol
    assert cosine_rows(outputs["logits"], reference).min() >= tolerance.min_cosine


# --- CliRunner --------------------------------------------------------------------------


def test_info_shows_the_verified_manifest(cnn_bundle, keypair):
    result = CliRunner().invoke(cli, ["info", str(cnn_bundle), "--pubkey", str(keypair[1])])

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("bundle     digits-cnn 0.1.0 (")
    assert f"signed by  {key_id(load_public_key(keypair[1]))}" in lines
    assert "target     x86-64-avx2 (x86_64, accelerator none)" in lines
    assert "backend    onnx: CPUExecutionProvider" in lines
    assert "inputs     image: float32[batch, 1, 8, 8]" in lines
    assert "outputs    logits: float32[batch, 10]" in lines


def test_info_load_shows_the_providers_in_use(cnn_bundle, keypair):
    result = CliRunner().invoke(
        cli, ["info", str(cnn_bundle), "--pubkey", str(keypair[1]), "--load"]
    )

    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["providers"] == ["CPUExecutionProvider"]
    assert facts["profile"] == "x86-64-avx2"


@pytest.mark.parametrize("command", ["info", "selftest"])
def test_commands_refuse_a_tampered_bundle(command, tampered_bundle, keypair):
    result = CliRunner().invoke(cli, [command, str(tampered_bundle), "--pubkey", str(keypair[1])])

    assert isinstance(result.exception, BundleError)
    assert "does not match its sha256" in str(result.exception)
    assert result.stdout == ""


def test_selftest_passes_on_the_real_bundle(cnn_bundle, keypair):
    result = CliRunner().invoke(cli, ["selftest", str(cnn_bundle), "--pubkey", str(keypair[1])])

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("self-test PASS: 8 vectors, max abs error ")


def test_selftest_json_report(cnn_bundle, keypair):
    result = CliRunner().invoke(
        cli, ["selftest", str(cnn_bundle), "--pubkey", str(keypair[1]), "--json"]
    )

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is True
    assert report["vectors"] == 8
    assert report["failures"] == []
    assert report["max_abs_error"] <= report["atol"]


def test_selftest_uses_trusted_keys_from_the_environment(cnn_bundle, keypair):
    runner = CliRunner(env={"EDGEPACK_TRUSTED_KEYS": str(keypair[1].parent)})

    result = runner.invoke(cli, ["selftest", str(cnn_bundle)])

    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("key_args", "error"),
    [
        pytest.param(lambda other: [], TrustError, id="no-key"),
        pytest.param(lambda other: ["--pubkey", str(other)], SignatureError, id="wrong-key"),
    ],
)
def test_selftest_refuses_without_the_signing_key(cnn_bundle, other_keypair, key_args, error):
    args = ["selftest", str(cnn_bundle), *key_args(other_keypair[1])]

    result = CliRunner().invoke(cli, args)

    assert isinstance(result.exception, error)
    assert result.stdout == ""


def test_run_writes_outputs_matching_the_fp32_reference(
    cnn_bundle, keypair, input_npz, vectors, bundle_files, tmp_path
):
    output = tmp_path / "out.npz"

    result = CliRunner().invoke(
        cli,
        ["run", str(cnn_bundle), "--pubkey", str(keypair[1])]
        + ["--input", str(input_npz), "--output", str(output)],
    )

    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {output}: logits[8, 10]\n"
    with np.load(output, allow_pickle=False) as data:
        outputs = {name: data[name] for name in data.files}
    assert_matches_reference(outputs, vectors, bundle_files)


def test_run_passes_the_threads_override_on(cnn_bundle, keypair, input_npz, monkeypatch, tmp_path):
    calls = []
    real_open = Runtime.open.__func__

    def recording_open(cls, *args, **kwargs):
        calls.append((args, kwargs))
        return real_open(cls, *args, **kwargs)

    monkeypatch.setattr(Runtime, "open", classmethod(recording_open))

    result = CliRunner().invoke(
        cli,
        ["run", str(cnn_bundle), "--pubkey", str(keypair[1]), "--threads", "1"]
        + ["--input", str(input_npz), "--output", str(tmp_path / "out.npz")],
    )

    assert result.exit_code == 0, result.output
    assert calls == [((cnn_bundle, keypair[1]), {"threads": 1, "providers": None})]


@pytest.mark.parametrize(
    ("arrays", "phrase"),
    [
        pytest.param(
            {"image": np.array([object(), None], dtype=object)},
            "pickled arrays are refused",
            id="object-array",
        ),
        pytest.param(
            {"image": np.zeros((2, 1, 8, 8), dtype=np.float64)},
            "has dtype float64, needs float32; expected image: float32[batch, 1, 8, 8]",
            id="float64",
        ),
        pytest.param(
            {"pixels": np.zeros((2, 1, 8, 8), dtype=np.float32)},
            "unknown inputs ['pixels']; expected image: float32[",
            id="wrong-name",
        ),
    ],
)
def test_run_refuses_bad_input_files(cnn_bundle, keypair, arrays, phrase, tmp_path):
    input_path = tmp_path / "bad.npz"
    np.savez(input_path, **arrays)
    output = tmp_path / "out.npz"

    result = CliRunner().invoke(
        cli,
        ["run", str(cnn_bundle), "--pubkey", str(keypair[1])]
        + ["--input", str(input_path), "--output", str(output)],
    )

    assert isinstance(result.exception, InputSignatureError)
    assert phrase in str(result.exception)
    assert not output.exists()


def test_run_refuses_a_missing_input_file(cnn_bundle, keypair, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["run", str(cnn_bundle), "--pubkey", str(keypair[1])]
        + ["--input", str(tmp_path / "missing.npz"), "--output", str(tmp_path / "out.npz")],
    )

    assert isinstance(result.exception, InputSignatureError)
    assert "does not exist" in str(result.exception)


def test_run_without_input_is_a_usage_error(cnn_bundle, tmp_path):
    result = CliRunner().invoke(cli, ["run", str(cnn_bundle), "--output", str(tmp_path / "o.npz")])

    assert result.exit_code == 2
    assert "Missing option '--input'" in result.output


# --- the error boundary (main) ----------------------------------------------------------


def test_main_renders_a_library_error_as_one_red_line(tampered_bundle, keypair, monkeypatch):
    argv = ["edge-runtime", "selftest", str(tampered_bundle), "--pubkey", str(keypair[1])]
    monkeypatch.setattr(sys, "argv", argv)

    with (
        CliRunner().isolation(color=True) as (stdout, stderr, _),
        pytest.raises(SystemExit) as exit_,
    ):
        main()

    assert exit_.value.code == 1
    assert stdout.getvalue() == b""
    lines = stderr.getvalue().decode().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{RED}error: ")
    assert "does not match its sha256" in lines[0]


def test_main_with_debug_shows_the_traceback(tampered_bundle, keypair, monkeypatch):
    argv = [
        "edge-runtime",
        "--debug",
        "selftest",
        str(tampered_bundle),
        "--pubkey",
        str(keypair[1]),
    ]
    monkeypatch.setattr(sys, "argv", argv)

    with pytest.raises(BundleError, match="does not match its sha256"):
        main()


# --- real subprocesses ------------------------------------------------------------------


def test_subprocess_selftest_exits_0_on_a_good_bundle(edge_runtime, cnn_bundle, keypair):
    completed = edge_runtime("selftest", cnn_bundle, "--pubkey", keypair[1])

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("self-test PASS: 8 vectors")
    # Nothing on stderr but, on a host with fewer CPUs than the profile's 4, the note
    # that says the runtime used fewer threads.
    cpus = usable_cpus()
    note = f"note: threads: profile asks for 4, this process may use {cpus.describe()}; "
    assert completed.stderr == ("" if cpus.count >= 4 else f"{note}using {cpus.count}\n")


def test_subprocess_selftest_exits_1_with_one_error_line_on_a_tampered_bundle(
    edge_runtime, tampered_bundle, keypair
):
    completed = edge_runtime("selftest", tampered_bundle, "--pubkey", keypair[1])

    assert completed.returncode == 1
    assert completed.stdout == ""
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("error: ")
    assert f"'{MODEL}' does not match its sha256" in lines[0]


def test_subprocess_run_writes_outputs_matching_the_fp32_reference(
    edge_runtime, cnn_bundle, keypair, input_npz, vectors, bundle_files, tmp_path
):
    output = tmp_path / "out.npz"

    completed = edge_runtime(
        "run", cnn_bundle, "--pubkey", keypair[1], "--input", input_npz, "--output", output
    )

    assert completed.returncode == 0, completed.stderr
    with np.load(output, allow_pickle=False) as data:
        outputs = {name: data[name] for name in data.files}
    assert_matches_reference(outputs, vectors, bundle_files)


def test_subprocess_run_refuses_a_pickled_input(edge_runtime, cnn_bundle, keypair, tmp_path):
    input_path = tmp_path / "pickled.npz"
    np.savez(input_path, image=np.array([{"payload": 1}], dtype=object))
    output = tmp_path / "out.npz"

    completed = edge_runtime(
        "run", cnn_bundle, "--pubkey", keypair[1], "--input", input_path, "--output", output
    )

    assert completed.returncode == 1
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("error: ")
    assert "pickled arrays are refused" in lines[0]
    assert not output.exists()


def test_subprocess_usage_error_exits_2(edge_runtime, cnn_bundle):
    completed = edge_runtime("run", cnn_bundle)

    assert completed.returncode == 2
    assert "Missing option '--input'" in completed.stderr


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        pytest.param("npy", "holds a single array", id="plain-npy"),
        pytest.param("garbage", "is not a readable .npz", id="garbage"),
        pytest.param("missing", "does not exist", id="missing"),
    ],
)
def test_run_refuses_input_files_that_are_not_npz(cnn_bundle, keypair, tmp_path, content, phrase):
    input_path = tmp_path / "input.npz"
    if content == "npy":
        with open(input_path, "wb") as handle:
            np.save(handle, np.zeros((1, 1, 8, 8), dtype=np.float32))
    elif content == "garbage":
        input_path.write_bytes(b"definitely not numpy")

    result = CliRunner().invoke(
        cli,
        ["run", str(cnn_bundle), "--pubkey", str(keypair[1])]
        + ["--input", str(input_path), "--output", str(tmp_path / "out.npz")],
    )

    assert isinstance(result.exception, InputSignatureError)
    assert phrase in str(result.exception)
    assert not (tmp_path / "out.npz").exists()


def test_selftest_takes_provider_and_thread_overrides(cnn_bundle, keypair):
    result = CliRunner().invoke(
        cli,
        ["info", str(cnn_bundle), "--pubkey", str(keypair[1]), "--load"]
        + ["--providers", "CUDAExecutionProvider,CPUExecutionProvider", "--threads", "1"],
    )

    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["providers"] == ["CPUExecutionProvider"]


# --- the group-level options --------------------------------------------------------------


def test_group_json_reaches_a_command_with_its_own_json_flag(cnn_bundle, keypair):
    args = ["--json", "selftest", str(cnn_bundle), "--pubkey", str(keypair[1])]

    result = CliRunner().invoke(cli, args)

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"] is True


@pytest.mark.parametrize("where", ["before", "after"])
def test_json_before_or_after_the_command(cnn_bundle, keypair, input_npz, tmp_path, where):
    args = ["run", str(cnn_bundle), "--pubkey", str(keypair[1]), "--input", str(input_npz)]
    args += ["-o", str(tmp_path / "out.npz")]

    result = CliRunner().invoke(cli, ["--json", *args] if where == "before" else [*args, "--json"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    written = np.load(tmp_path / "out.npz")
    shapes = {"logits": list(written["logits"].shape)}
    assert report == {"output": str(tmp_path / "out.npz"), "shapes": shapes}


def test_main_with_debug_after_the_command_shows_the_traceback(
    tampered_bundle, keypair, monkeypatch
):
    argv = ["edge-runtime", "selftest", str(tampered_bundle), "--pubkey", str(keypair[1])]
    argv.append("--debug")
    monkeypatch.setattr(sys, "argv", argv)

    with pytest.raises(BundleError, match="does not match its sha256"):
        main()


def test_debug_verbose_and_json_are_in_the_help():
    for args in (["--help"], ["selftest", "--help"], ["agent", "--help"]):
        shown = CliRunner().invoke(cli, args)

        assert shown.exit_code == 0
        assert "--debug" in shown.output
        assert "-v, --verbose" in shown.output
        assert "--json" in shown.output


# --- edge-runtime agent: options generated from AgentSettings -----------------------------

AGENT_BASE = ["agent", "b.edgepkg", "--fleet", "plant", "--device-id", "pi-1"]
# field -> (the flags a user types, the value AgentSettings then holds)
AGENT_FLAG_VALUES = {
    "broker": (["--broker", "mqtt://broker.local:1884"], "mqtt://broker.local:1884"),
    "username": (["--username", "dev"], "dev"),
    "password": (["--password", "s3cret"], "s3cret"),
    "tls_ca": (["--tls-ca", "ca.pem"], Path("ca.pem")),
    "tls_cert": (["--tls-cert", "cert.pem"], Path("cert.pem")),
    "tls_key": (["--tls-key", "key.pem"], Path("key.pem")),
    "mqtt_version": (["--mqtt-version", "3.1.1"], "3.1.1"),
    "keepalive_s": (["--keepalive-s", "30"], 30),
    "fleet": (["--fleet", "shop"], "shop"),
    "device_id": (["--device-id", "pi-9"], "pi-9"),
    "state_dir": (["--state-dir", "state"], Path("state")),
    "metrics_interval_s": (["--metrics-interval-s", "2.5"], 2.5),
    "outbox_max_mb": (["--outbox-max-mb", "8"], 8.0),
    "outbox_max_age_h": (["--outbox-max-age-h", "12"], 12.0),
    "window": (["--window", "50"], 50),
    "resend_acked_s": (["--resend-acked-s", "2.5"], 2.5),
    "pubkey": (["--pubkey", "k.pub"], Path("k.pub")),
    "demo_load": (["--demo-load", "3"], 3.0),
    "threads": (["--threads", "2"], 2),
}


@pytest.fixture
def agent_settings(monkeypatch):
    """Run ``edge-runtime agent`` in process up to the library call; return its settings."""
    for name in list(os.environ):
        if name.startswith("EDGE_RUNTIME_"):
            monkeypatch.delenv(name)
    seen = {}

    def fake_run_agent(settings, stop):
        seen["settings"] = settings
        return 0

    monkeypatch.setattr("edge_runtime.agent.run_agent", fake_run_agent)
    monkeypatch.setattr("edge_runtime.cli.stop_on_signals", lambda stop: None)

    def invoke(*args: str):
        result = CliRunner().invoke(cli, [*AGENT_BASE, *args])
        assert result.exit_code == 0, result.output
        return seen["settings"]

    return invoke


def test_every_agent_setting_has_a_flag_whose_help_is_its_description():
    from edge_runtime.agent import AgentSettings
    from edge_runtime.cli_options import SettingOption

    options = {
        p.field_name: p for p in cli.commands["agent"].params if isinstance(p, SettingOption)
    }

    assert set(options) | {"bundle"} == set(AgentSettings.model_fields)  # BUNDLE: argument
    for name, option in options.items():
        assert option.help == AgentSettings.model_fields[name].description
    assert set(AGENT_FLAG_VALUES) == set(options)


@pytest.mark.parametrize("field", sorted(AGENT_FLAG_VALUES))
def test_each_agent_flag_reaches_the_settings(agent_settings, field):
    args, expected = AGENT_FLAG_VALUES[field]

    settings = agent_settings(*args)

    value = getattr(settings, field)
    assert (value.get_secret_value() if field == "password" else value) == expected
    assert settings.bundle == Path("b.edgepkg")


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--window", "0"],
            "--window 0: Input should be greater than or equal to 1 (allowed: 1 <= x <= 10000)",
        ),
        (
            ["--keepalive-s", "1"],
            "--keepalive-s 1: Input should be greater than or equal to 5 (allowed: x >= 5)",
        ),
        (
            ["--outbox-max-mb", "0"],
            "--outbox-max-mb 0.0: Input should be greater than 0 (allowed: x > 0)",
        ),
    ],
)
def test_an_out_of_range_agent_option_is_one_line_and_exit_2(monkeypatch, capsys, args, line):
    monkeypatch.setattr(sys, "argv", ["edge-runtime", *AGENT_BASE, *args])

    with pytest.raises(SystemExit) as exit_:
        main()

    captured = capsys.readouterr()
    assert exit_.value.code == 2
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        f"error: invalid settings ({line}); settings come from flags, EDGE_RUNTIME_* "
        "environment variables, or --config FILE"
    ]


@pytest.mark.slow
def test_generate_json_prints_one_object(smollm2_pi5_bundle, keypair):
    args = ["--json", "generate", str(smollm2_pi5_bundle), "--pubkey", str(keypair[1])]
    args += ["Name the three primary colors.", "--temperature", "0", "--max-tokens", "8"]

    result = CliRunner().invoke(cli, args)

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"text", "completion_tokens", "finish_reason"}
    assert report["completion_tokens"] == 8
    assert report["finish_reason"] == "length"
    assert report["text"].strip()
