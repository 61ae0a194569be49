"""Text in: a bundle's Hugging Face tokenizer turns text into the model's inputs, and an
embedding model's outputs into one normalised vector per text.

The manifest's ``text`` section (``TextSpec``) says how: which inputs the tokenizer fills,
the maximum length, padding and truncation, and for embeddings the pooling. The
``tokenizers`` library (Rust wheels, no torch) is imported only when a bundle has a
tokenizer, so a device that runs tensors alone never needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BackendError, BundleError, InputSignatureError
from .manifest import TensorSpec, TextSpec

if TYPE_CHECKING:  # annotations only: importing this module loads no numpy
    import numpy as np

# Texts fed to the model at once by ``embed``: bounds the activations of a long request
# (attention alone is batch x heads x length^2 floats per layer).
EMBED_CHUNK = 32


def import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise BackendError(
            "this bundle carries a tokenizer, which needs the tokenizers library: "
            "pip install 'edgepack[text]'"
        ) from None
    return tokenizers


@dataclass(frozen=True)
class TextBatch:
    """Texts as the model takes them: ``feeds`` by input name, padded alike.

    ``lengths`` holds each text's tokens (special tokens included, padding not) and
    ``attention_mask`` marks them, whether or not the model takes a mask as an input.
    """

    feeds: dict[str, np.ndarray]
    attention_mask: np.ndarray
    lengths: list[int]

    @property
    def tokens(self) -> int:
        """All tokens of all texts, padding not counted (what a usage report counts)."""
        return sum(self.lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def rows(self, start: int, stop: int, columns: int | None = None) -> TextBatch:
        """Texts ``start:stop``, cut to the first ``columns`` positions (right padding
        only, so the cut drops padding alone when ``columns`` covers the longest)."""
        cut = slice(None, columns)
        return TextBatch(
            feeds={name: value[start:stop, cut] for name, value in self.feeds.items()},
            attention_mask=self.attention_mask[start:stop, cut],
            lengths=self.lengths[start:stop],
        )


class TextEncoder:
    """The bundle's tokenizer, set up as its manifest says (the file's own padding and
    truncation settings are replaced, so the device pads as the build recorded)."""

    def __init__(self, path: Path, spec: TextSpec, inputs: list[TensorSpec]) -> None:
        tokenizers = import_tokenizers()
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception on bad JSON
            raise BundleError(
                f"the bundle's tokenizer {spec.tokenizer} does not load: {exc}"
            ) from None
        tokenizer.no_padding()
        tokenizer.no_truncation()
        if spec.truncation:
            tokenizer.enable_truncation(max_length=spec.max_length)
        tokenizer.enable_padding(
            direction="right",
            pad_id=spec.pad_id,
            pad_token=spec.pad_token,
            length=spec.max_length if spec.padding == "max_length" else None,
        )
        self.spec = spec
        self._tokenizer = tokenizer
        by_name = {tensor.name: tensor for tensor in inputs}
        self._dtypes = {role: by_name[name].dtype for role, name in spec.inputs.items()}

    def encode(self, texts: Sequence[str]) -> TextBatch:
        """Tokenize ``texts`` into one batch.

        Raises:
            InputSignatureError: ``texts`` is not a non-empty list of strings, or a text
                is longer than ``max_length`` tokens and the bundle does not truncate.
        """
        import numpy as np

        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise InputSignatureError("texts must be a non-empty list of strings")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputSignatureError(f"text {index} is a {type(text).__name__}, not a str")
        encodings = self._tokenizer.encode_batch(list(texts))
        mask = np.array([encoding.attention_mask for encoding in encodings], dtype=np.int64)
        lengths = [int(count) for count in mask.sum(axis=1)]
        limit = self.spec.max_length
        for index, length in enumerate(lengths):
            if length > limit:
                raise InputSignatureError(
                    f"text {index} is {length} tokens; this model takes at most {limit} "
                    "(its bundle does not truncate): shorten or split the text"
                )
        fields = {
            "input_ids": lambda encoding: encoding.ids,
            "attention_mask": lambda encoding: encoding.attention_mask,
            "token_type_ids": lambda encoding: encoding.type_ids,
        }
        feeds = {
            self.spec.inputs[role]: np.array(
                [fields[role](encoding) for encoding in encodings], dtype=self._dtypes[role]
            )
            for role in self.spec.inputs
        }
        return TextBatch(feeds=feeds, attention_mask=mask, lengths=lengths)


def pool(output: np.ndarray, attention_mask: np.ndarray, spec: TextSpec) -> np.ndarray:
    """One float32 vector per text from ``spec.output``, pooled and L2-normalised as the
    manifest says.

    Raises:
        BackendError: the output's shape does not fit the pooling (a broken bundle).
    """
    import numpy as np

    values = np.asarray(output, dtype=np.float32)
    want = 2 if spec.pooling == "pooled" else 3
    if values.ndim != want:
        raise BackendError(
            f"output {spec.output!r} has shape {list(values.shape)}; {spec.pooling} pooling "
            f"needs rank {want}; rebuild the bundle with the right --pooling"
        )
    if spec.pooling == "mean":
        mask = attention_mask[:, : values.shape[1], None].astype(np.float32)
        vectors = (values * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
    elif spec.pooling == "cls":
        vectors = values[:, 0, :]
    else:
        vectors = values
    if spec.normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def chunks(batch: TextBatch, spec: TextSpec, fixed_batch: int | None) -> list[tuple[Any, int]]:
    """The batch in pieces the model runs at once: (piece, texts in it). A model whose
    batch axis is fixed (e.g. 1) gets pieces of exactly that size, the last one padded
    with copies of its final text; padding to ``longest`` is cut per piece."""
    size = fixed_batch or EMBED_CHUNK
    pieces = []
    for start in range(0, len(batch), size):
        stop = min(start + size, len(batch))
        columns = None
        if spec.padding == "longest":
            columns = max(batch.lengths[start:stop])
        piece = batch.rows(start, stop, columns)
        if fixed_batch and stop - start < fixed_batch:
            piece = _repeat_last(piece, fixed_batch)
        pieces.append((piece, stop - start))
    return pieces


def _repeat_last(piece: TextBatch, size: int) -> TextBatch:
    import numpy as np

    extra = size - len(piece)

    def grow(value: np.ndarray) -> np.ndarray:
        return np.concatenate([value, np.repeat(value[-1:], extra, axis=0)])

    return TextBatch(
        feeds={name: grow(value) for name, value in piece.feeds.items()},
        attention_mask=grow(piece.attention_mask),
        lengths=piece.lengths + [piece.lengths[-1]] * extra,
    )
