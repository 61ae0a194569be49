"""llama.cpp backend (llama-cpp-python): streamed text generation from a GGUF bundle.

Generation runs on ``Llama.generate``, the same token loop llama-cpp-python's own
``create_completion`` uses, so the facade adds only detokenizing and stop-string checks
per token. The GGUF header is checked by ``edge_runtime.gguf`` before llama.cpp sees it.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import BackendError
from ..manifest import Manifest
from . import BackendOptions, GenerativeBackend, TokenStream, engine_threads

log = logging.getLogger(__name__)


def import_llama_cpp():
    """llama_cpp, with llama.cpp's own logging (hundreds of lines per load) kept quiet."""
    try:
        import llama_cpp
        from llama_cpp._logger import set_verbose
    except ImportError:
        raise BackendError(
            "this bundle needs llama.cpp: pip install 'edgepack[llm]' (llama-cpp-python; "
            "on arm64 it builds from source, see docs/llm.md)"
        ) from None
    # llama-cpp-python routes llama.cpp's log through this logger; errors still show.
    set_verbose(False)
    return llama_cpp


def open_llama(
    model_path: Path,
    *,
    context_length: int,
    threads: int,
    gpu_layers: int = 0,
    logits_all: bool = False,
    batch: int = 512,
    seed: int = 0,
):
    """Load a GGUF file with llama-cpp-python, quietly; the header must be checked first."""
    llama_cpp = import_llama_cpp()
    try:
        return llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=context_length,
            n_batch=min(batch, context_length),
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=gpu_layers,
            logits_all=logits_all,
            seed=seed,
            verbose=False,
        )
    except (ValueError, RuntimeError) as exc:  # llama-cpp-python's load failures
        raise BackendError(f"llama.cpp could not load {model_path.name}: {exc}") from exc


def is_end_of_generation(llm, token: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token))


def last_logits(llm):
    """The logits of the last evaluated token, as a numpy view (no copy)."""
    import llama_cpp
    import numpy as np

    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),))


def greedy_continuation(llm, prompt: str, count: int) -> tuple[list[int], list[float]]:
    """The first ``count`` greedy tokens after ``prompt``, and each one's logit margin.

    The margin (top-1 minus top-2 logit) tells the self-test how close each choice was:
    another CPU's kernels may legitimately flip a near-tie, never a clear winner.
    """
    import numpy as np

    llm.reset()
    llm.eval(llm.tokenize(prompt.encode(), add_bos=True, special=False))
    tokens: list[int] = []
    margins: list[float] = []
    for _ in range(count):
        logits = last_logits(llm)
        top_two = np.argpartition(logits, -2)[-2:]
        best, runner_up = sorted(top_two, key=lambda index: -logits[index])
        tokens.append(int(best))
        margins.append(float(logits[best] - logits[runner_up]))
        if is_end_of_generation(llm, int(best)):
            break
        llm.eval([int(best)])
    llm.reset()
    return tokens, margins


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest


class LlamaCppBackend(GenerativeBackend):
    name = "llamacpp"

    def __init__(self) -> None:
        self._llm = None
        self._manifest: Manifest | None = None
        self._threads = 0
        self._gpu_layers = 0
        self._context_length = 0
        self._metadata: dict[str, Any] = {}

    def load(self, model_dir: Path, manifest: Manifest, options: BackendOptions) -> None:
        from ..gguf import gguf_metadata, read_gguf

        if manifest.llm is None:
            raise BackendError("the manifest of this llamacpp bundle has no llm section")
        model_path = model_dir / manifest.model.path
        header = read_gguf(model_path)  # refuses a malformed file before llama.cpp parses it
        spec = manifest.backend
        if spec.name != "llamacpp":
            raise BackendError(f"the llama.cpp backend cannot run a {spec.name} bundle")
        choice = engine_threads("llama.cpp", spec.intra_op_threads, options, zero_counts_cores=True)
        # llama.cpp needs a number: 0 means every CPU this process may use.
        self._threads = choice.threads or choice.cpus.count
        self._gpu_layers = spec.gpu_layers if options.gpu_layers is None else options.gpu_layers
        self._context_length = options.context_length or manifest.llm.context_length
        self._manifest = manifest
        self._metadata = gguf_metadata(header.metadata)
        self._llm = open_llama(
            model_path,
            context_length=self._context_length,
            threads=self._threads,
            gpu_layers=self._gpu_layers,
        )
        self.thread_choice = choice

    def _require(self):
        if self._llm is None:
            raise BackendError("the llama.cpp backend is closed or was never loaded")
        return self._llm

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.95,
        top_k: int = 40,
        seed: int | None = None,
        stop: Sequence[str] = (),
        special: bool = False,
    ) -> TokenStream:
        llm = self._require()
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if temperature < 0:
            raise ValueError("temperature must be >= 0 (0 = greedy)")
        prompt_tokens = llm.tokenize(prompt.encode(), add_bos=True, special=special)
        room = self._context_length - len(prompt_tokens)
        if room < 1:
            raise ValueError(
                f"the prompt is {len(prompt_tokens)} tokens but the context holds "
                f"{self._context_length}; shorten it or raise --context-length"
            )
        if seed is not None:
            llm.set_seed(seed)
        limit, stops = min(max_tokens, room), list(stop)
        return TokenStream(
            lambda stream: self._pieces(
                stream, prompt_tokens, limit, temperature, top_p, top_k, stops
            ),
            prompt_tokens=len(prompt_tokens),
        )

    def _pieces(self, stream, prompt_tokens, limit, temperature, top_p, top_k, stops):
        llm = self._llm
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""  # decoded text not yet yielded: it may be the start of a stop string
        tokens = llm.generate(
            prompt_tokens, temp=temperature, top_p=top_p, top_k=top_k, min_p=0.05, reset=True
        )
        try:
            for token in tokens:
                if is_end_of_generation(llm, token):
                    stream.finish_reason = "stop"
                    break
                stream.completion_tokens += 1
                pending += decoder.decode(llm.detokenize([token]))
                if stops:
                    hits = [pending.find(s) for s in stops if s in pending]
                    if hits:
                        if min(hits) > 0:
                            yield pending[: min(hits)]
                        stream.finish_reason = "stop"
                        return
                    keep = _held_back(pending, stops)
                    ready, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
                else:
                    ready, pending = pending, ""
                if ready:
                    yield ready
                if stream.completion_tokens >= limit:
                    stream.finish_reason = "length"
                    break
            pending += decoder.decode(b"", final=True)
            if pending:
                yield pending
        finally:
            tokens.close()

    def chat(self, messages: list[dict[str, str]], **options: Any) -> TokenStream:
        """Format ``messages`` with the model's own chat template, then ``generate``."""
        prompt, stops = self.format_chat(messages)
        options["stop"] = list(options.get("stop") or ()) + stops
        return self.generate(prompt, special=True, **options)

    def format_chat(self, messages: list[dict[str, str]]) -> tuple[str, list[str]]:
        llm = self._require()
        template = self._manifest.llm.chat_template
        if not template:
            raise BackendError(
                "this model has no chat template in its GGUF metadata; use generate(prompt)"
            )
        for message in messages:
            if not isinstance(message, dict) or {"role", "content"} - set(message):
                raise ValueError('each message must be a dict with "role" and "content"')
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def token_text(token_id: int) -> str:
            return llm.detokenize([token_id], special=True).decode(errors="replace")

        eos = token_text(llm.token_eos())
        formatter = Jinja2ChatFormatter(
            template, eos_token=eos, bos_token=token_text(llm.token_bos())
        )
        response = formatter(messages=messages)
        prompt = response.prompt
        stops = response.stop if isinstance(response.stop, list) else [response.stop or eos]
        return prompt, [stop for stop in stops if stop]

    def greedy_tokens(self, prompt: str, count: int) -> tuple[list[int], list[float]]:
        return greedy_continuation(self._require(), prompt, count)

    def token_text(self, tokens: list[int]) -> str:
        return self._require().detokenize(tokens).decode(errors="replace")

    def metadata(self) -> dict[str, Any]:
        """The GGUF header's general.* and tokenizer.* values that are strings or numbers
        (arrays such as the token list are left out)."""
        return dict(self._metadata)

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
        self._llm = None
        self._metadata = {}

    @property
    def engine(self):
        return self._llm

    def info(self) -> dict[str, Any]:
        return {
            "threads": self._threads,
            "gpu_layers": self._gpu_layers,
            "context_length": self._context_length,
        }
