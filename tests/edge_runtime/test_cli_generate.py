"""Tests for edge_runtime/cli.py on language-model bundles: ``generate``, ``selftest``, ``info``.

``generate`` runs as the installed console script in a subprocess, as on a device, so
its streaming, its exit codes and its Ctrl-C handling are the real ones.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_runtime.cli import cli

PROMPT = "The three primary colors are"
# "What is the capital of France?" alone is a near-tie at the first token (see
# tests/edge_runtime/backends/test_llamacpp.py); this wording answers in English.
QUESTION = "What is the capital of France? Answer in one sentence."
LLM_BUNDLES = [
    pytest.param("smollm2_pi5_bundle", id="pi5-Q4_K_M"),
    pytest.param("smollm2_x86_bundle", id="x86-Q8_0"),
]


@pytest.fixture
def edge_runtime_command(tmp_path) -> tuple[list[str], dict[str, str]]:
    """The installed ``edge-runtime`` console script, and an environment for it."""
    script = Path(sys.executable).with_name("edge-runtime")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "edge_runtime.cli"]
    return command, {**os.environ, "TMPDIR": str(tmp_path / "tmp")}


@pytest.fixture
def edge_runtime(edge_runtime_command):
    """Run ``edge-runtime ARGS`` to completion."""
    command, env = edge_runtime_command

    def invoke(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
        )

    return invoke


# --- generate ----------------------------------------------------------------------------


@pytest.mark.slow
def test_generate_streams_text_and_reports_tokens(edge_runtime, smollm2_pi5_bundle, keypair):
    done = edge_runtime(
        "generate",
        smollm2_pi5_bundle,
        "--pubkey",
        keypair[1],
        PROMPT,
        "--temperature",
        "0",
        "--max-tokens",
        "20",
    )

    assert done.returncode == 0, done.stderr
    assert "primary colors" in done.stdout and "red" in done.stdout
    assert done.stderr.strip().splitlines()[-1] == "[20 tokens, finish: length]"
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_generate_chat_uses_the_template(edge_runtime, smollm2_x86_bundle, keypair):
    done = edge_runtime(
        "generate",
        smollm2_x86_bundle,
        "--pubkey",
        keypair[1],
        "--chat",
        QUESTION,
        "--temperature",
        "0",
        "--max-tokens",
        "40",
    )

    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "<|im_" not in done.stdout
    assert re.fullmatch(r"\[\d+ tokens, finish: stop\]", done.stderr.strip().splitlines()[-1])


def test_generate_on_an_onnx_bundle_is_one_red_line(edge_runtime, cnn_bundle, keypair):
    done = edge_runtime("generate", cnn_bundle, "--pubkey", keypair[1], PROMPT)

    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: bundle 'digits-cnn' holds an ONNX model, not a language model; use run(inputs)"
    ]
    assert done.stdout == ""


@pytest.mark.slow
def test_ctrl_c_stops_generation_with_exit_code_130(
    edge_runtime_command, smollm2_pi5_bundle, keypair
):
    command, env = edge_runtime_command
    args = ["generate", smollm2_pi5_bundle, "--pubkey", keypair[1], "Once upon a time"]
    args += ["--max-tokens", "100000", "--context-length", "4096", "--temperature", "0"]
    # SIGINT ignored in the child from the start, as a background job has it: generate must
    # still stop on it.
    process = subprocess.Popen(
        [*command, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 120)
        assert ready, "no text arrived within 120 s"
        first = os.read(process.stdout.fileno(), 4096)
        started = time.monotonic()

        process.send_signal(signal.SIGINT)
        # generous: on a loaded 2-core CI box, unwinding and freeing the model takes seconds
        rest, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert first
    assert process.returncode == 130
    assert time.monotonic() - started < 60
    stderr_text = stderr.decode(errors="replace")
    assert re.search(r"^\[stopped after \d+ tokens\]$", stderr_text, re.MULTILINE), stderr_text
    assert "Traceback" not in stderr_text and "KeyboardInterrupt" not in stderr_text
    assert rest.endswith(b"\n")


# --- selftest and info -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("bundle_fixture", LLM_BUNDLES)
def test_selftest_reports_greedy_tokens(bundle_fixture, request, keypair):
    bundle = request.getfixturevalue(bundle_fixture)

    result = CliRunner().invoke(cli, ["selftest", str(bundle), "--pubkey", str(keypair[1])])

    assert result.exit_code == 0, result.output
    line = result.stdout.splitlines()[0]
    assert re.fullmatch(
        r"self-test PASS: (\d+) of 16 greedy tokens match the build host's", line
    ), line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("bundle_fixture", "expected"),
    [
        pytest.param(
            "smollm2_pi5_bundle",
            [
                "llm        llama, 135M parameters, Q4_K_M from F16",
                "context    4096 tokens, 0 GPU layers, 4 threads",
                "chat       template included",
            ],
            id="pi5-Q4_K_M",
        ),
        pytest.param(
            "smollm2_x86_bundle",
            [
                "llm        llama, 135M parameters, Q8_0 from F16",
                "context    4096 tokens, 0 GPU layers, all threads",
                "chat       template included",
            ],
            id="x86-Q8_0",
        ),
    ],
)
def test_info_shows_the_language_model_lines(bundle_fixture, expected, request, keypair):
    bundle = request.getfixturevalue(bundle_fixture)

    result = CliRunner().invoke(cli, ["info", str(bundle), "--pubkey", str(keypair[1])])

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    at = lines.index(expected[0])
    assert lines[at : at + 3] == expected
    assert any(line.startswith("backend    llamacpp") for line in lines)
    assert not any(line.startswith(("inputs ", "outputs ")) for line in lines)
