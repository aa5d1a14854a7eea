"""Batched greedy generation (KV cache, left padding) vs one prompt at a time, through secvec's generate."""

from __future__ import annotations

import time

from benchmarks.common import build_model as build
from benchmarks.common import paired_ratio, result, workload
from secvec.generate import generate


def generation_speedup(size: str = "tiny", n_prompts: int = 64, max_new_tokens: int = 32, rounds: int = 2) -> list[dict]:
    """Seconds for n prompts one at a time over seconds for them in one batch; same function and model.

    The model is freshly initialised, so replies rarely stop early and both arms generate close to
    max_new_tokens per prompt (a worst case for batching: no finished rows to drop).
    """
    tokenizer = workload().tokenizer
    model = build(tokenizer, size)
    prompts = workload().prompts[::max(len(workload().prompts) // n_prompts, 1)][:n_prompts]
    generate(model, tokenizer, prompts[:2], max_new_tokens=2, batch_size=2)  # warm-up

    def timed(batch_size: int) -> tuple[float, list[str]]:
        start = time.perf_counter()
        replies = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        return time.perf_counter() - start, replies

    batched, single = [], []
    for _ in range(rounds):
        batched.append(timed(len(prompts)))
        single.append(timed(1))
    speedup = paired_ratio([s for s, _ in single], [s for s, _ in batched])
    same = sum(a == b for a, b in zip(batched[0][1], single[0][1], strict=True))
    return [result("generation_speedup", speedup["median"], "x (one-at-a-time seconds / batched seconds)",
                   target=">= 5", passed=speedup["median"] >= 5, model=size, prompts=len(prompts),
                   max_new_tokens=max_new_tokens, rounds=rounds, speedup=speedup,
                   batched_s=round(min(s for s, _ in batched), 3), one_at_a_time_s=round(min(s for s, _ in single), 3),
                   identical_replies=f"{same}/{len(prompts)}")]
