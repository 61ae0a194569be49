"""GGUF builds (packager/formats/gguf.py, run by packager/pipeline.py) on the real SmolLM2.

The two shipped-profile bundles are the session fixtures; the few extra builds use a
short evaluation text and 128-token windows. Every refusal of a bad source starts from
the real F16 file and happens before llama.cpp is asked to load anything.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_runtime.bundle import verify_bundle
from packager.build import BuildConfig, build_bundle
from packager.cli import cli
from packager.errors import DataError, GateError, ModelValidationError, PackagerError
from packager.examples.smollm2 import shipped_gguf
from packager.formats.gguf import SELFTEST_PROMPT, SELFTEST_TIE_MARGIN
from packager.llm_eval import DEFAULT_EVAL_TEXT
from packager.profiles import load_profile

SHORT_EVAL_CHARS = 4000
LLM_METRICS = {
    "perplexity",
    "source_perplexity",
    "ppl_increase",
    "kl_divergence_mean",
    "top1_agreement",
}
BUNDLES = [
    pytest.param("raspberry-pi-5", "smollm2_pi5_bundle", "Q4_K_M", id="pi5-Q4_K_M"),
    pytest.param("x86-64-avx2", "smollm2_x86_bundle", "Q8_0", id="x86-Q8_0"),
]
# SmolLM2-135M: 30 layers, 3 KV heads of 64 + 64 values, f16 cache at 4096 tokens
SMOLLM2_KV_MB = 30 * 4096 * 3 * (64 + 64) * 2 / 2**20


@pytest.fixture(scope="module")
def short_eval(tmp_path_factory) -> Path:
    """The start of the shipped evaluation text: enough for a few 128-token windows."""
    path = tmp_path_factory.mktemp("eval") / "short.txt"
    text = DEFAULT_EVAL_TEXT.read_text(encoding="utf-8")[:SHORT_EVAL_CHARS]
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def no_engine(monkeypatch):
    """Fail the test if llama.cpp is asked to load, tokenize with or quantize a model."""
    import llama_cpp

    def refuse(*args, **kwargs):
        raise AssertionError("llama.cpp was called before the build refused the input")

    for name in ("Llama", "llama_model_load_from_file", "llama_model_quantize"):
        monkeypatch.setattr(llama_cpp, name, refuse)


def gguf_config(model: Path, key: Path, output: Path, eval_text: Path, **options) -> BuildConfig:
    """A small, quick GGUF build: short windows, no host measurement."""
    options.setdefault("profile", load_profile("x86-64-avx2"))
    return BuildConfig(
        model=model,
        key=key,
        output=output,
        eval=eval_text,
        llm_window=128,
        measure=False,
        **options,
    )


def profile_with_chain(tmp_path: Path, quant_types: list[str]):
    """A copy of x86-64-avx2 under another name, trying ``quant_types`` in order."""
    import yaml

    data = load_profile("x86-64-avx2").model_dump(mode="json")
    data["name"] = "x86-two-step"
    data["gguf"]["quant_types"] = quant_types
    path = tmp_path / "x86-two-step.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_profile(path=path)


# --- the shipped-profile bundles ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("profile_name", "bundle_fixture", "quant_type"), BUNDLES)
def test_manifest_records_the_language_model_facts(
    profile_name, bundle_fixture, quant_type, request, keypair
):
    profile = load_profile(profile_name)

    manifest = verify_bundle(request.getfixturevalue(bundle_fixture), keypair[1]).manifest

    llm = manifest.llm
    assert manifest.backend.name == "llamacpp"
    assert manifest.model.format == "gguf"
    assert manifest.model.precision == manifest.model.recipe == quant_type
    assert (llm.quant_type, llm.source_type, llm.architecture) == (quant_type, "F16", "llama")
    assert llm.context_length == profile.gguf.context_length
    assert manifest.backend.gpu_layers == profile.gguf.gpu_layers
    assert manifest.backend.intra_op_threads == profile.gguf.threads
    assert "im_start" in llm.chat_template
    assert (llm.tokenizer.vocab_size, llm.tokenizer.eos_token_id) == (49152, 2)
    assert manifest.inputs == [] and manifest.outputs == []
    assert manifest.target.profile == profile_name
    steps = manifest.steps
    assert [step.name for step in steps] == ["GgufValidate", "GgufQuantize"]
    assert steps[0].output_sha256 is None  # validation writes no model
    assert steps[1].config == {"quant_type": quant_type, "threads": 0, "allow_requantize": False}
    assert steps[1].output_sha256 == manifest.file(manifest.model.path).sha256


@pytest.mark.slow
@pytest.mark.parametrize(("profile_name", "bundle_fixture", "quant_type"), BUNDLES)
def test_manifest_records_the_gate_memory_and_selftest(
    profile_name, bundle_fixture, quant_type, request, keypair
):
    profile = load_profile(profile_name)

    manifest = verify_bundle(request.getfixturevalue(bundle_fixture), keypair[1]).manifest

    quantization = manifest.quantization
    assert [(a.recipe, a.status) for a in quantization.attempts] == [(quant_type, "passed")]
    assert quantization.chosen == quant_type
    metrics = quantization.attempts[0].metrics
    assert set(metrics) >= LLM_METRICS
    assert metrics["ppl_increase"] == pytest.approx(
        metrics["perplexity"] / metrics["source_perplexity"] - 1, abs=1e-4
    )
    assert 0 <= metrics["ppl_increase"] <= quantization.max_degradation == 0.10
    assert metrics["kl_divergence_mean"] > 0
    assert 0.5 < metrics["top1_agreement"] <= 1
    assert quantization.attempts[0].size_bytes == manifest.file(manifest.model.path).size
    memory = manifest.memory
    assert set(memory.parts) == {"weights_mb", "kv_cache_mb", "compute_mb"}
    assert memory.parts["kv_cache_mb"] == pytest.approx(SMOLLM2_KV_MB, abs=0.1)
    assert memory.required_mb == pytest.approx(sum(memory.parts.values()), abs=0.2)
    assert memory.required_mb <= memory.budget_mb == profile.model_memory_budget_mb
    assert (memory.basis, manifest.measurements) == ("estimated", None)
    selftest = manifest.selftest
    assert (selftest.kind, selftest.prompt) == ("greedy-tokens", SELFTEST_PROMPT)
    assert len(selftest.tokens) == len(selftest.margins) == 16
    assert all(margin >= 0 for margin in selftest.margins)
    assert selftest.tie_margin == SELFTEST_TIE_MARGIN
    assert selftest.text.strip()


@pytest.mark.slow
def test_q4_k_m_is_smaller_and_loses_more_than_q8_0(
    smollm2_pi5_bundle, smollm2_x86_bundle, keypair
):
    q4 = verify_bundle(smollm2_pi5_bundle, keypair[1]).manifest
    q8 = verify_bundle(smollm2_x86_bundle, keypair[1]).manifest

    assert q4.file(q4.model.path).size < q8.file(q8.model.path).size
    q4_metrics, q8_metrics = (
        q4.quantization.attempts[0].metrics,
        q8.quantization.attempts[0].metrics,
    )
    assert q8_metrics["ppl_increase"] < q4_metrics["ppl_increase"]
    assert q8_metrics["kl_divergence_mean"] < q4_metrics["kl_divergence_mean"]
    assert q4_metrics["source_perplexity"] == q8_metrics["source_perplexity"]


# --- the gate ----------------------------------------------------------------------------


@pytest.mark.slow
def test_gate_falls_back_from_q2_k_to_q8_0(smollm2_example, keypair, short_eval, tmp_path):
    config = gguf_config(
        smollm2_example.model,
        keypair[0],
        tmp_path / "b.edgepkg",
        short_eval,
        profile=profile_with_chain(tmp_path, ["Q2_K", "Q8_0"]),
        max_ppl_increase=0.10,
    )

    result = build_bundle(config)

    manifest = verify_bundle(result.bundle, keypair[1]).manifest
    q2, q8 = manifest.quantization.attempts
    assert (q2.recipe, q2.status) == ("Q2_K", "failed")
    assert "perplexity" in q2.reason
    assert q2.metrics["ppl_increase"] > 0.10
    assert (q8.recipe, q8.status, q8.reason) == ("Q8_0", "passed", None)
    assert q2.size_bytes < q8.size_bytes
    assert manifest.quantization.chosen == manifest.llm.quant_type == "Q8_0"
    assert manifest.target.profile == "x86-two-step"


@pytest.mark.slow
def test_no_type_passing_the_gate_fails_with_every_attempt(
    smollm2_example, keypair, short_eval, tmp_path
):
    config = gguf_config(
        smollm2_example.model,
        keypair[0],
        tmp_path / "b.edgepkg",
        short_eval,
        quant="Q2_K",
        max_ppl_increase=0.01,
    )

    with pytest.raises(GateError) as error:
        build_bundle(config)

    message = str(error.value)
    assert "no quantization type met the perplexity gate (+1%)" in message
    assert "Q2_K: failed (perplexity +" in message
    assert "--max-ppl-increase" in message
    assert [(a.recipe, a.status) for a in error.value.attempts] == [("Q2_K", "failed")]
    assert not (tmp_path / "b.edgepkg").exists()


# --- refusals ----------------------------------------------------------------------------


def truncate_mid_tensor_data(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def corrupt_magic(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"GGUX")


def claim_2_40_tensors(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(8)  # after the magic and the version: the tensor count
        f.write(struct.pack("<Q", 2**40))


def cut_the_last_4_kb(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 4096)


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        pytest.param(truncate_mid_tensor_data, r"data ends at byte \d+ but the file is", id="half"),
        pytest.param(corrupt_magic, r"not a GGUF file: bad magic b'GGUX'", id="magic"),
        pytest.param(claim_2_40_tensors, r"claims 1099511627776 tensors", id="tensor-count"),
        pytest.param(cut_the_last_4_kb, r"data ends at byte \d+ .*truncated", id="past-eof"),
    ],
)
def test_malformed_source_is_refused_before_llama_cpp_runs(
    corrupt, expected, smollm2_example, keypair, short_eval, tmp_path, no_engine
):
    model = tmp_path / "broken.gguf"
    shutil.copyfile(smollm2_example.model, model)
    corrupt(model)
    config = gguf_config(model, keypair[0], tmp_path / "b.edgepkg", short_eval)

    with pytest.raises(ModelValidationError, match=expected) as error:
        build_bundle(config)

    assert str(model) in str(error.value)
    assert not (tmp_path / "b.edgepkg").exists()


def test_quantized_source_is_refused_without_allow_requantize(
    keypair, short_eval, tmp_path, no_engine
):
    config = gguf_config(shipped_gguf(), keypair[0], tmp_path / "b.edgepkg", short_eval)

    with pytest.raises(ModelValidationError) as error:
        build_bundle(config)

    message = str(error.value)
    assert "is already quantized (Q4_1)" in message
    assert "--allow-requantize" in message and "F16" in message


@pytest.mark.slow
def test_quantized_source_builds_with_allow_requantize_and_a_warning(keypair, short_eval, tmp_path):
    config = gguf_config(
        shipped_gguf(), keypair[0], tmp_path / "b.edgepkg", short_eval, allow_requantize=True
    )
    messages: list[str] = []

    with pytest.warns(UserWarning, match=r"already quantized \(Q4_1\); requantizing"):
        result = build_bundle(config, messages.append)

    llm = verify_bundle(result.bundle, keypair[1]).manifest.llm
    assert (llm.source_type, llm.quant_type) == ("Q4_1", "Q8_0")
    assert any(m.startswith("warning: ") and "already quantized" in m for m in messages)


def test_unknown_quant_type_is_refused_before_any_work(
    smollm2_example, keypair, short_eval, tmp_path, no_engine
):
    config = gguf_config(
        smollm2_example.model, keypair[0], tmp_path / "b.edgepkg", short_eval, quant="Q3_X"
    )

    with pytest.raises(PackagerError, match=r"unknown llama.cpp quantization type 'Q3_X'") as error:
        build_bundle(config)

    assert "Q4_K_M" in str(error.value) and "Q8_0" in str(error.value)


@pytest.mark.parametrize(
    "options, flags",
    [
        ({"metric": {"logits": "top1"}}, "--metric"),
        ({"metric_plugin": "mine:score"}, "--metric-plugin"),
        ({"task": "detection", "constant": {"sr": "1"}}, "--task, --constant"),
        ({"batch_axis": {"x": 1}, "state": {"s": "t"}}, "--batch-axis, --state"),
        ({"selftest_vectors": 2}, "--selftest-vectors"),
    ],
)
def test_tensor_only_options_are_refused_for_gguf(
    smollm2_example, keypair, short_eval, tmp_path, no_engine, options, flags
):
    config = gguf_config(
        smollm2_example.model, keypair[0], tmp_path / "b.edgepkg", short_eval, **options
    )

    with pytest.raises(PackagerError, match=rf"^{flags}: ONNX and TFLite options") as error:
        build_bundle(config)

    assert "--max-ppl-increase" in str(error.value)
    assert not (tmp_path / "b.edgepkg").exists()


def test_non_text_eval_file_is_refused(smollm2_example, keypair, tmp_path, no_engine):
    eval_npz = tmp_path / "eval.npz"
    eval_npz.write_bytes(b"PK\x03\x04")
    config = gguf_config(smollm2_example.model, keypair[0], tmp_path / "b.edgepkg", eval_npz)

    with pytest.raises(DataError, match=r"eval.npz: for a GGUF model, --eval takes a UTF-8 .txt"):
        build_bundle(config)


@pytest.mark.slow
def test_eval_text_too_short_is_refused(smollm2_example, keypair, tmp_path):
    eval_text = tmp_path / "tiny.txt"
    eval_text.write_text("The quick brown fox jumps over the lazy dog.", encoding="utf-8")
    config = gguf_config(smollm2_example.model, keypair[0], tmp_path / "b.edgepkg", eval_text)

    with pytest.raises(DataError, match=r"the evaluation text is only \d+ tokens; give at least"):
        build_bundle(config)

    assert not (tmp_path / "b.edgepkg").exists()


# --- the CLI -----------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_build_prints_the_perplexity_table_and_writes_the_bundle(
    smollm2_example, keypair, short_eval, tmp_path
):
    bundle = tmp_path / "smollm2.edgepkg"
    args = ["build", str(smollm2_example.model), "--profile", "x86-64-avx2"]
    args += ["--key", str(keypair[0]), "-o", str(bundle), "--quant", "Q8_0"]
    args += ["--no-measure", "--eval", str(short_eval)]

    result = CliRunner().invoke(cli, args)

    assert result.exit_code == 0, result.output
    assert "quantization attempts (perplexity gate)" in result.output
    for column in ("type", "perplexity", "ppl +", "KL mean", "top-1 agree", "chosen"):
        assert column in result.output
    row = next(line for line in result.output.splitlines() if "│ Q8_0 " in line)
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert (cells[0], cells[1], cells[-1]) == ("Q8_0", "passed", "yes")
    assert f"wrote {bundle}" in result.output
    assert verify_bundle(bundle, keypair[1]).manifest.llm.quant_type == "Q8_0"


def test_cli_unknown_quant_exits_1_with_one_line(smollm2_example, keypair, tmp_path):
    args = ["build", str(smollm2_example.model), "--profile", "x86-64-avx2"]
    args += ["--key", str(keypair[0]), "-o", str(tmp_path / "b.edgepkg"), "--quant", "Q3_X"]

    done = subprocess.run(
        [sys.executable, "-c", "from packager.cli import main; main()", *args],
        capture_output=True,
        text=True,
        check=False,
    )

    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: unknown llama.cpp quantization type 'Q3_X'; known: ")
    assert "Traceback" not in done.stderr
