"""Measure one GGUF model in a fresh process, the way llama-bench does.

Run as ``python -m packager.llm_bench_worker '{"model": ..., "threads": ...}'``; prints one
JSON line. pp: ``pp_tokens`` prompt tokens evaluated as one batch from an empty context.
tg: ``tg_tokens`` tokens evaluated one at a time from an empty context. Each is run once
untimed, then ``repetitions`` times; the mean rate is reported. Token ids are random, as
in llama-bench: speed does not depend on which tokens they are.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from packager.measure_worker import _peak_rss_mb, _reset_peak


def _pp_rate(llm, tokens: list[int]) -> float:
    llm.reset()
    started = time.perf_counter()
    llm.eval(tokens)
    return len(tokens) / (time.perf_counter() - started)


def _tg_rate(llm, tokens: list[int]) -> float:
    llm.reset()
    started = time.perf_counter()
    for token in tokens:
        llm.eval([token])
    return len(tokens) / (time.perf_counter() - started)


def measure(request: dict) -> dict:
    from edge_runtime.backends.llamacpp import open_llama

    _reset_peak()
    started = time.perf_counter()
    pp_tokens, tg_tokens = request["pp_tokens"], request["tg_tokens"]
    llm = open_llama(
        Path(request["model"]),
        context_length=max(pp_tokens, tg_tokens),
        threads=request["threads"],
        batch=pp_tokens,
    )
    load_seconds = time.perf_counter() - started
    pick = random.Random(0)
    vocab = llm.n_vocab()
    prompt = [pick.randrange(vocab) for _ in range(pp_tokens)]
    generated = [pick.randrange(vocab) for _ in range(tg_tokens)]
    _pp_rate(llm, prompt), _tg_rate(llm, generated[:8])  # warm-up, as llama-bench does
    repetitions = request["repetitions"]
    pp = [_pp_rate(llm, prompt) for _ in range(repetitions)]
    tg = [_tg_rate(llm, generated) for _ in range(repetitions)]
    llm.close()
    return {
        "threads": request["threads"],
        "repetitions": repetitions,
        "pp_tokens": pp_tokens,
        "pp_tokens_per_s": round(sum(pp) / len(pp), 2),
        "tg_tokens": tg_tokens,
        "tg_tokens_per_s": round(sum(tg) / len(tg), 2),
        "peak_memory_mb": round(_peak_rss_mb(), 1),
        "load_seconds": round(load_seconds, 3),
    }


def main() -> None:
    print(json.dumps(measure(json.loads(sys.argv[1]))))


if __name__ == "__main__":
    main()
