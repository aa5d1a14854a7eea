"""Training benchmarks: guarded vs plain throughput, model FLOPs utilisation, scaling with data size."""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from benchmarks.common import (
    LARGE,
    StepMeter,
    count_params,
    finetune_config,
    paired_ratio,
    result,
    with_vector,
    workload,
)
from benchmarks.common import build_model as build
from secvec.guarded import finetune

ARMS = ("plain", "merged", "adapter")


@dataclass(frozen=True)
class Run:
    """One timed fine-tuning call."""

    tokens_per_s: float | None  # real tokens over the measured steps (the first step is warm-up)
    wasted_share: float | None
    wall_s: float  # the whole call: encoding, Trainer set-up, vector merge and checks, training


def timed_finetune(model, examples: list[dict], steps: int, batch_size: int = 32, vector_mode: str = "merged",
                   warmup: int = 1) -> Run:
    """`secvec.guarded.finetune` (guarded when `model` carries the vector, plain otherwise) for `steps` steps."""
    tokenizer = workload().tokenizer
    meter = StepMeter(model, tokenizer.pad_token_id, warmup)
    cfg = finetune_config(steps, batch_size, vector_mode=vector_mode)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        finetune(model, tokenizer, examples, cfg, out, callbacks=[meter])
        wall = time.perf_counter() - start
    return Run(meter.tokens_per_s, meter.wasted_share, wall)


def alternate(arms: dict[str, Callable[[], Run]], rounds: int) -> dict[str, list[Run]]:
    """Run every arm once per round, rotating the order so no arm always follows the same one."""
    names, runs = list(arms), {name: [] for name in arms}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            runs[name].append(arms[name]())
    return runs


def compare_modes(size: str, steps: int, rounds: int, batch_size: int = 32) -> dict:
    """Plain vs guarded fine-tuning (merged and adapter vector modes) of one model size, alternated."""
    tokenizer = workload().tokenizer
    examples = workload().examples(steps * batch_size)
    plain, guarded = build(tokenizer, size), with_vector(build(tokenizer, size))
    models = {"plain": (plain, "merged"), "merged": (guarded, "merged"), "adapter": (guarded, "adapter")}

    def arm(name: str, data: list[dict], n_steps: int) -> Callable[[], Run]:
        model, mode = models[name]
        return lambda: timed_finetune(model, data, n_steps, batch_size, mode)

    alternate({name: arm(name, examples[: 2 * batch_size], 2) for name in ARMS}, 1)  # warm-up, untimed
    runs = alternate({name: arm(name, examples, steps) for name in ARMS}, rounds)
    tps = {arm: [r.tokens_per_s for r in runs[arm]] for arm in ARMS}
    return {
        "model": size,
        "params": count_params(plain),
        "steps_per_run": steps,
        "batch_size": batch_size,
        "rounds": rounds,
        "tokens_per_s": {arm: round(statistics.median(v), 1) for arm, v in tps.items()},
        "merged_over_plain": paired_ratio(tps["merged"], tps["plain"]),
        "adapter_over_plain": paired_ratio(tps["adapter"], tps["plain"]),
        "wall_s_merged_over_plain": paired_ratio([r.wall_s for r in runs["merged"]],
                                                 [r.wall_s for r in runs["plain"]]),
    }


def guarded_vs_plain_throughput(sizes: Sequence[str] = ("tiny", LARGE), steps: dict[str, int] | None = None,
                                rounds: int = 7) -> list[dict]:
    """Tokens/s of guarded fine-tuning (merged vector, the default) over plain full fine-tuning.

    Both arms run `secvec.guarded.finetune` on the same data, order and settings; one record per size,
    with the adapter vector mode alongside for contrast. The ratios are medians of per-round ratios (each
    round runs every arm back to back) with their range: on 2 shared cores one round's ratio can swing by
    10-20 %, so `tiny` gets 7 rounds (~25 s each) for a steadier median.
    """
    steps = steps or {"micro": 4, "tiny": 10, LARGE: 4}
    # ~3 s a step: three rounds (the fewest with a true median) keep the large model near 3 minutes
    rounds_per_size = {LARGE: min(rounds, 3)}
    records = []
    for size in sizes:
        details = compare_modes(size, steps[size], rounds_per_size.get(size, rounds))
        name = "guarded_vs_plain_throughput" + ("" if size == "tiny" else f"_{size.replace('bench-', '')}")
        value = details["merged_over_plain"]["median"]
        records.append(result(name, value, "ratio of tokens/s (guarded merged / plain)", target=">= 0.97",
                              passed=value >= 0.97, **details))
    return records


def matmul_peak(sizes: Sequence[int] = (512, 1024, 2048), seconds: float = 1.0) -> dict[int, float]:
    """Best fp32 FLOP/s of square matmuls (2 n^3 FLOPs each) per size, repeated for `seconds` each."""
    peaks = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
        peaks[n] = best
    return peaks


def train_mfu(throughput: Sequence[dict]) -> list[dict]:
    """Model FLOPs utilisation: tokens/s x 6 x params over this machine's fp32 matmul peak, measured now.

    Args:
        throughput: the records of `guarded_vs_plain_throughput` (their tokens/s and params).
    """
    peaks = matmul_peak()
    peak = max(peaks.values())
    per_model = {}
    for record in throughput:
        flops = {arm: 6 * record["params"] * tps for arm, tps in record["tokens_per_s"].items()}
        per_model[record["model"]] = {"params": record["params"], "tokens_per_s": record["tokens_per_s"],
                                      "mfu": {arm: round(f / peak, 4) for arm, f in flops.items()}}
    first = per_model[throughput[0]["model"]]
    return [result("train_mfu", first["mfu"]["merged"], "fraction of measured fp32 matmul peak",
                   model=throughput[0]["model"], arm="guarded (merged)",
                   peak_gflops={n: round(p / 1e9, 1) for n, p in peaks.items()}, models=per_model,
                   flops_per_token="6 x params (attention scores left out: ~3% at these lengths)")]


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) on log(x): the k of y ~ x^k."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y on x."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)
    return my - slope * mx, slope


def scaling(size: str = "tiny", base_examples: int = 96, factors: Sequence[int] = (1, 4, 16),
            batch_size: int = 32) -> list[dict]:
    """Guarded fine-tuning time (one epoch over 1x, 4x, 16x the examples) and the k of time ~ tokens^k.

    The time is the whole `finetune` call, so its fixed part (encoding set-up, Trainer, vector merge and
    checks) shows up as k below 1; the fitted line gives that fixed part in seconds.
    """
    tokenizer = workload().tokenizer
    guarded = with_vector(build(tokenizer, size))
    timed_finetune(guarded, workload().examples(batch_size * 2), 2, batch_size)  # warm-up
    points = []
    for factor in factors:
        examples = workload().examples(base_examples * factor)
        tokens = sum(len(tokenizer.apply_chat_template(ex["messages"], tokenize=True, return_dict=False))
                     for ex in examples)
        run = timed_finetune(guarded, examples, len(examples) // batch_size, batch_size)
        points.append({"factor": factor, "examples": len(examples), "tokens": tokens, "seconds": round(run.wall_s, 3),
                       "tokens_per_s_loop": run.tokens_per_s and round(run.tokens_per_s, 1)})
    xs, ys = [p["tokens"] for p in points], [p["seconds"] for p in points]
    exponent = fit_exponent(xs, ys)
    fixed, per_token = fit_line(xs, ys)
    return [result("scaling", exponent, "exponent k of time ~ tokens^k", target="close to 1", model=size,
                   points=points, fixed_seconds=round(fixed, 3), seconds_per_1k_tokens=round(per_token * 1e3, 4))]
