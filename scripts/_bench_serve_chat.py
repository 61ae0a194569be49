"""For scripts/bench_serve.py, part (c): streaming chat, serve against llama.cpp's server.

Both servers get the same GGUF file (extracted from the signed bundle serve loads), the
same llama.cpp settings (threads, n_ctx, n_batch) and, round by round, the same request
from the same client: the official openai client, ``stream=True``, temperature 0, a seed.
Each round's user message starts with its own number, so neither server answers a prompt
it has already evaluated (llama-cpp-python reuses a matching prefix of its KV cache).
Tokens are counted by tokenizing the streamed text with the model's own vocabulary, the
same way for both, so a server that sends several tokens in one chunk is not undercounted.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import _bench_serve_procs as procs
from bench_onnx import Figure

GOAL = 0.97  # serve / llama_cpp.server decode tokens/s, at least
ALIAS = "smollm2"
SEED = 7
SKIPPED = "skipped: the OpenAI routes are not in this build"
QUESTION = (
    "Write a long story about an old clockmaker and his curious granddaughter, who find a "
    "hidden door in the workshop."
)


@dataclass(frozen=True)
class Chat:
    """One streamed chat: its text, and seconds from the call to the first and last piece."""

    text: str
    first: float
    last: float
    finish: str | None


def chat(client, round_: int, max_tokens: int) -> Chat:
    """One streamed chat completion; a timestamp per content chunk."""
    started = time.perf_counter()
    stream = client.chat.completions.create(
        model=ALIAS,
        messages=[{"role": "user", "content": f"Story {round_}. {QUESTION}"}],
        max_tokens=max_tokens,
        temperature=0,
        seed=SEED,
        stream=True,
    )
    pieces, stamps, finish = [], [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta and choice.delta.content:
            stamps.append(time.perf_counter() - started)
            pieces.append(choice.delta.content)
        finish = choice.finish_reason or finish
    if not stamps:
        raise RuntimeError(f"a streamed chat gave no text (finish_reason {finish})")
    return Chat("".join(pieces), stamps[0], stamps[-1], finish)


def extract_gguf(bundle: Path, pub: Path, folder: Path) -> tuple[Path, int]:
    """The bundle's GGUF file, verified and extracted; and its context length."""
    from edge_runtime.bundle import extract_bundle, verify_bundle

    verified = verify_bundle(bundle, pub)
    root = extract_bundle(verified, folder / "smollm2-files")
    return root / verified.manifest.model.path, verified.manifest.llm.context_length


def bench_chat(bundle: Path, pub: Path, folder: Path, plan, note) -> tuple[list[Figure], list]:
    """(c) serve's /v1/chat/completions against llama_cpp.server; (figures, notes)."""
    import openai
    from bench_llm import quiet_llama_cpp

    from edge_runtime.cpus import usable_cpus

    folder.mkdir(parents=True, exist_ok=True)
    note("(c) starting edge-runtime serve on the SmolLM2 bundle")
    serve = procs.start_serve("serve-smollm2", f"{ALIAS}={bundle}", pub, folder)
    llama = None
    try:
        if procs.call("GET", f"{serve.url}/v1/models")[0] == 404:
            note(f"(c) {SKIPPED}")
            title = "SmolLM2 streaming chat, decode tokens/s, serve / llama_cpp.server"
            return [Figure("c", title, SKIPPED, f">= {GOAL}", None, "")], [f"(c) {SKIPPED}"]
        gguf, context = extract_gguf(bundle, pub, folder)
        threads = usable_cpus().count
        note(f"(c) starting llama_cpp.server on {gguf.name}, {threads} threads, n_ctx {context}")
        llama = procs.start_llama_server(gguf, ALIAS, threads, context, folder, SEED)
        vocabulary = quiet_llama_cpp().Llama(model_path=str(gguf), vocab_only=True, verbose=False)
        clients = {
            name: openai.OpenAI(
                base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600
            )
            for name, server in (("serve", serve), ("llama_cpp.server", llama))
        }
        runs: dict[str, list[Chat]] = {name: [] for name in clients}
        for name, client in clients.items():
            note(f"(c) warm-up: {name}")
            chat(client, 0, plan.max_tokens)
        for index in range(plan.chats):
            for name in list(clients) if index % 2 == 0 else list(clients)[::-1]:
                note(f"(c) round {index + 1}/{plan.chats}: {name}")
                runs[name].append(chat(clients[name], index + 1, plan.max_tokens))
    finally:
        serve.stop()
        if llama is not None:
            llama.stop()

    def tokens(run: Chat) -> int:
        return len(vocabulary.tokenize(run.text.encode(), add_bos=False, special=False))

    def decode(run: Chat) -> float:
        return (tokens(run) - 1) / (run.last - run.first) if run.last > run.first else 0.0

    rate = {name: statistics.median(decode(run) for run in found) for name, found in runs.items()}
    first = {
        name: statistics.median(run.first for run in found) * 1000 for name, found in runs.items()
    }
    counts = {name: [tokens(run) for run in found] for name, found in runs.items()}
    pairs = zip(runs["serve"], runs["llama_cpp.server"], strict=True)
    same = sum(a.text == b.text for a, b in pairs)
    ratio = rate["serve"] / rate["llama_cpp.server"]
    spread = {
        name: f"{rate[name]:.1f} tok/s ({min(map(decode, found)):.1f}-"
        f"{max(map(decode, found)):.1f}), first token {first[name]:.0f} ms"
        for name, found in runs.items()
    }
    settings = (
        f"max_tokens {plan.max_tokens}, {min(min(c) for c in counts.values())}-"
        f"{max(max(c) for c in counts.values())} tokens per answer; same text from both in "
        f"{same} of {plan.chats} rounds; {threads} threads, n_ctx {context} in both"
    )
    figures = [
        Figure(
            "c",
            "SmolLM2 streaming chat, decode tokens/s, serve / llama_cpp.server",
            f"{ratio:.3f}",
            f">= {GOAL}",
            ratio >= GOAL,
            f"serve {spread['serve']}; llama_cpp.server {spread['llama_cpp.server']}; {settings}",
        ),
        Figure(
            "c",
            "SmolLM2 streaming chat, time to first token, serve / llama_cpp.server",
            f"{first['serve'] / first['llama_cpp.server']:.3f}",
            "-",
            None,
            f"{first['serve']:.0f} ms / {first['llama_cpp.server']:.0f} ms, medians",
        ),
    ]
    said = [
        f"(c) GGUF {gguf.name} from the bundle; llama_cpp.server given --n_threads and "
        f"--n_threads_batch {threads}, --n_ctx {context}, --n_batch {min(512, context)} (the "
        "runtime's llama.cpp settings); decode = tokens/s from the first streamed piece to "
        "the last, tokens counted by the model's vocabulary on the streamed text"
    ]
    return figures, said
