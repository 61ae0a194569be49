"""Perplexity and KL divergence of a GGUF model on evaluation text, the way llama.cpp's
``llama-perplexity`` computes them.

The token stream is cut into windows of ``window`` tokens; each window is evaluated from
an empty context and only its second half is scored, so every scored token has at least
half a window of context. The KL divergence compares, token by token, the candidate's
next-token distribution with the source model's on the same windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edge_runtime.backends.llamacpp import import_llama_cpp, open_llama
from edge_runtime.cpus import usable_cpus

from .errors import DataError

if TYPE_CHECKING:  # numpy loads with the first score, not with `edgepack --help`
    import numpy as np

MIN_WINDOW = 32
# Shipped with edgepack: original prose on unrelated topics (see docs/llm.md).
DEFAULT_EVAL_TEXT = Path(__file__).with_name("llm_eval.txt")


def check_eval_text(path: Path | None) -> Path:
    """The evaluation text to use (the default when ``path`` is None), checked up front."""
    path = path or DEFAULT_EVAL_TEXT
    if path.suffix.lower() != ".txt":
        raise DataError(f"{path.name}: for a GGUF model, --eval takes a UTF-8 .txt file")
    if not path.is_file():
        raise DataError(f"evaluation text {path} does not exist")
    return path


def read_eval_text(path: Path | None) -> str:
    path = check_eval_text(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from None


@dataclass
class TextScore:
    """Per-token results of one model on the evaluation windows."""

    nll: np.ndarray  # negative log-likelihood of each scored token
    top1: np.ndarray  # the model's most likely next token at each scored position
    kl: np.ndarray | None = None  # KL(source || this model) per scored token
    # source only: its log-probabilities per window, kept to compare candidates against
    log_probs: list[np.ndarray] = field(default_factory=list)

    @property
    def perplexity(self) -> float:
        import numpy as np

        return float(np.exp(self.nll.mean()))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    import numpy as np

    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)


def tokenize_text(model_path: Path, text: str) -> list[int]:
    """Tokens of ``text`` with the model's own tokenizer (vocabulary only, no weights read)."""
    llama_cpp = import_llama_cpp()

    model = llama_cpp.llama_model_load_from_file(
        str(model_path).encode(), _vocab_only_params(llama_cpp)
    )
    if not model:
        raise DataError(f"llama.cpp could not read the tokenizer of {model_path.name}")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        raw = text.encode()
        size = len(raw) + 16
        buffer = (llama_cpp.llama_token * size)()
        count = llama_cpp.llama_tokenize(vocab, raw, len(raw), buffer, size, False, False)
        if count < 0:
            raise DataError("the evaluation text could not be tokenized")
        return list(buffer[:count])
    finally:
        llama_cpp.llama_model_free(model)


def _vocab_only_params(llama_cpp):
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    return params


def windows(tokens: list[int], window: int) -> list[list[int]]:
    """Cut ``tokens`` into whole windows; refuse text too short to say anything."""
    if len(tokens) < 2 * MIN_WINDOW:
        raise DataError(
            f"the evaluation text is only {len(tokens)} tokens; give at least "
            f"{2 * MIN_WINDOW} (a few paragraphs), e.g. --eval my-text.txt"
        )
    window = min(window, len(tokens) // 2)
    return [tokens[i : i + window] for i in range(0, len(tokens) - window + 1, window)]


def score_model(
    model_path: Path,
    chunks: list[list[int]],
    *,
    threads: int | None = None,
    reference: TextScore | None = None,
    keep_log_probs: bool = False,
) -> TextScore:
    """Score ``model_path`` on ``chunks``; with ``reference``, also the KL divergence."""
    import numpy as np

    window = len(chunks[0])
    llm = open_llama(
        model_path,
        context_length=window,
        threads=threads or usable_cpus().count,
        logits_all=True,
        batch=window,
    )
    nll, top1, kl, kept = [], [], [], []
    first = window // 2
    try:
        for index, chunk in enumerate(chunks):
            llm.reset()
            llm.eval(chunk)
            # logits at position i predict token i + 1; score the second half only
            log_probs = log_softmax(llm.scores[first : window - 1])
            targets = np.asarray(chunk[first + 1 : window])
            nll.append(-log_probs[np.arange(len(targets)), targets].astype(np.float64))
            top1.append(log_probs.argmax(axis=1))
            if reference is not None:
                source = reference.log_probs[index]
                kl.append((np.exp(source) * (source - log_probs)).sum(axis=1, dtype=np.float64))
            if keep_log_probs:
                kept.append(log_probs)
    finally:
        llm.close()
    return TextScore(
        nll=np.concatenate(nll),
        top1=np.concatenate(top1),
        kl=np.concatenate(kl) if kl else None,
        log_probs=kept,
    )


def compare_scores(candidate: TextScore, source: TextScore) -> dict[str, float]:
    """The gate's figures for ``candidate`` against ``source`` (6 significant digits)."""
    import numpy as np

    figures = {
        "perplexity": candidate.perplexity,
        "source_perplexity": source.perplexity,
        "ppl_increase": candidate.perplexity / source.perplexity - 1.0,
        "top1_agreement": float((candidate.top1 == source.top1).mean()),
        "scored_tokens": float(len(candidate.nll)),
    }
    if candidate.kl is not None:
        figures["kl_divergence_mean"] = float(candidate.kl.mean())
        figures["kl_divergence_p99"] = float(np.percentile(candidate.kl, 99))
    return {key: float(f"{value:.6g}") for key, value in figures.items()}
