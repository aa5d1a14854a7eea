"""What every benchmark shares: the result record, the workload, model builders and a step meter."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from unittest import mock

import torch
from transformers import TrainerCallback

from secvec import bootstrap
from secvec.config import DataConfig, FinetuneConfig, TrainConfig, VectorConfig
from secvec.data.synthetic import generate
from secvec.vector import attach_vector, freeze_vector

# A preset larger than the shipped ones, for the benchmarks only: hidden, layers, heads, intermediate, vocab.
LARGE = "bench-large"
LARGE_SIZE = (512, 8, 8, 1376, 2048)


def result(name: str, value: float, unit: str, **details) -> dict:
    """One benchmark figure: `name`, `value`, `unit`, then whatever explains it."""
    return {"name": name, "value": round(float(value), 4), "unit": unit, **details}


def to_line(record: dict) -> str:
    """The JSON line printed and stored for a result; refuses a record without name, value and unit."""
    for key, kind in (("name", str), ("value", float), ("unit", str)):
        if not isinstance(record.get(key), kind):
            raise TypeError(f"benchmark result needs {key!r} of type {kind.__name__}: {record}")
    return json.dumps(record, allow_nan=False)


def machine() -> dict:
    """The machine the figures come from."""
    with open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                   platform.processor())
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> dict:
    """Median of a[i] / b[i] over rounds (each pair measured back to back), with its range."""
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return {"median": round(statistics.median(ratios), 4), "min": round(min(ratios), 4),
            "max": round(max(ratios), 4)}


@dataclass(frozen=True)
class Workload:
    """The embedded default's data and a BPE tokenizer of the `tiny` vocabulary trained on it."""

    tokenizer: object
    finetune: list[dict]
    prompts: list[list[dict]]

    def examples(self, n: int) -> list[dict]:
        """The first n fine-tuning examples, cycled when n exceeds the role (1,000 for `default`)."""
        return [self.finetune[i % len(self.finetune)] for i in range(n)]


@cache
def workload(preset: str = "default") -> Workload:
    """The synthetic world of a data preset (as `make run` builds it) and its tokenizer."""
    world = generate(DataConfig(preset=preset))
    texts = [m["content"] for role in world.values() for ex in role for m in ex["messages"]]
    tokenizer = bootstrap.build_tokenizer(texts, bootstrap.SIZES["tiny"][4])
    prompts = [ex["messages"] for role in ("eval_harmful", "eval_over_refusal", "eval_utility")
               for ex in world[role]]
    return Workload(tokenizer, world["finetune"], prompts)


def build_model(tokenizer, size: str, seed: int = 0):
    """A fresh Llama of a shipped preset (`micro`, `tiny`) or of the benchmarks' LARGE preset."""
    with mock.patch.dict(bootstrap.SIZES, {LARGE: LARGE_SIZE}):
        return bootstrap.build_model(tokenizer, size, seed=seed)


def with_vector(model, seed: int = 0):
    """Attach a frozen security vector with random non-zero weights: the cost does not depend on values,
    and a zero dW (peft's init) would hide nothing but could let a shortcut go unnoticed."""
    peft_model = attach_vector(model, VectorConfig())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    freeze_vector(peft_model)
    return peft_model


def count_params(model) -> int:
    """Distinct backbone parameters (tied embeddings once, adapters excluded)."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def finetune_config(steps: int, batch_size: int = 32, max_length: int = 128, seed: int = 0,
                    vector_mode: str = "merged") -> FinetuneConfig:
    """The default fine-tuning settings (lr 3e-4, linear schedule, batch 32) cut to `steps` steps."""
    train = TrainConfig(learning_rate=3e-4, batch_size=batch_size, max_steps=steps, max_length=max_length,
                        seed=seed, progress_bar=False, logging_steps=10_000)
    return FinetuneConfig(vector_mode=vector_mode, train=train)


class StepMeter(TrainerCallback):
    """Wall time between consecutive optimizer steps and the tokens they fed in, after `warmup` steps.

    Tokens are counted where they enter the network (a hook on the input embedding), so one meter serves
    a plain model, a peft model and a stock Trainer alike; `real` leaves padding out.
    """

    def __init__(self, model: torch.nn.Module, pad_id: int, warmup: int = 1) -> None:
        self.pad_id, self.warmup = pad_id, warmup
        self.seconds, self.real, self.total, self.steps = 0.0, 0, 0, 0
        self._pending, self._last = [0, 0], 0.0
        self._hook = model.get_input_embeddings().register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        ids = args[0]
        self._pending[0] += int((ids != self.pad_id).sum())
        self._pending[1] += ids.numel()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if state.global_step > self.warmup:
            self.seconds += now - self._last
            self.real += self._pending[0]
            self.total += self._pending[1]
            self.steps += 1
        self._pending, self._last = [0, 0], now

    def on_train_end(self, args, state, control, **kwargs):
        self._hook.remove()

    @property
    def tokens_per_s(self) -> float | None:
        """Real (non-pad) tokens per second of the measured steps (None: no step after the warm-up)."""
        return self.real / self.seconds if self.steps else None

    @property
    def wasted_share(self) -> float | None:
        """Share of the tokens fed in that were padding (None: no step after the warm-up)."""
        return 1 - self.real / self.total if self.steps else None
