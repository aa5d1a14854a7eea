"""Self-contained GPU benchmark of guarded fine-tuning with a security vector (Zhou et al. 2023).

A security vector is a LoRA adapter fitted on harmful samples; it stays active and frozen while the
backbone is fine-tuned, and is removed afterwards. This script times three arms on a random-init Llama:

- ``plain``: full fine-tuning, no vector;
- ``guarded_adapter``: the vector attached with peft (rank 8, all 7 projections), frozen; the backbone trains;
- ``guarded_merged``: the same vector folded into the weights (W += B @ A * scaling) before training and
  subtracted after, so no adapter sits in the graph.

It prints one JSON object per line (``kind``: env, equivalence, arm, ratios, done; error on failure):
throughput (median over rounds, arms alternated), MFU against the device's dense bf16 peak, peak memory,
and a check that merged and adapter training leave the same clean backbone.

It imports only the standard library, torch, transformers and peft, so it runs alone on a machine that
has nothing else (it never imports this repository's package).

usage: python benchmarks/gpu_check.py [--device auto|cuda|cpu] [--size tiny|small|medium] [--rounds R]
       [--steps S] [--warmup W] [--batch B] [--seq T] [--seed N] [--peak-tflops F] [--max-seconds X]
       [--equiv-steps K] [--equiv-optim sgd|adamw] [--equiv-lr LR] [--equiv-tol TOL] [--out FILE.jsonl]

Defaults (medium, ~0.85B parameters, 7 rounds x 20 steps x 3 arms of 8 x 1024 tokens) are sized for an
H200: an estimated 2-4 minutes in all (not yet measured there), with --max-seconds 360 as a backstop.

exit status: 0 all good, 1 an error (JSON error line), 2 out of memory (JSON error line),
3 the equivalence check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import json
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 8, 16
SCALING = ALPHA / RANK  # peft's LoRA scaling (no rsLoRA): the merged arm must fold in exactly this
ARMS = ("plain", "guarded_adapter", "guarded_merged")
LR = 1e-5  # throughput arms: the value does not change the cost


@dataclass(frozen=True)
class Size:
    """A Llama shape and the batch it trains on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seq: int
    batch: int


SIZES = {
    "tiny": Size(64, 2, 4, 2, 172, 256, 32, 2),  # the CPU test
    "small": Size(1536, 16, 12, 4, 4096, 32000, 1024, 8),  # ~0.50B parameters
    "medium": Size(2048, 16, 16, 4, 5632, 32000, 1024, 8),  # ~0.85B parameters (TinyLlama's width)
}

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, keyed by a substring of get_device_name().
# The longest matching key wins, so "H100 PCIe" beats "H100" and "A100" beats "A10".
PEAK_BF16 = {
    "H200": 989e12, "GH200": 989e12, "H100": 989e12, "H800": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
    "H20": 148e12, "B200": 2250e12, "B100": 1750e12, "A100": 312e12, "A800": 312e12, "A10": 125e12,
    "A30": 165e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
    "RTX A6000": 155e12, "RTX 6000 Ada": 364e12,
}


class Budget:
    """Wall-clock budget of the whole run; the timed rounds stop early when the next would overrun it."""

    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, more_seconds: float) -> bool:
        return self.elapsed() + more_seconds <= self.seconds


# ----------------------------------------------------------------------------------------------- output


class Emitter:
    """Prints each record as one JSON line (flushed at once) and appends it to `--out` when given."""

    def __init__(self, out: Path | None) -> None:
        self.out, self.phase = out, "build"  # phase: where an error line says the run stopped
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("")

    def __call__(self, record: dict) -> None:
        line = json.dumps(record, allow_nan=False)
        print(line, flush=True)
        if self.out:
            with self.out.open("a") as fh:
                fh.write(line + "\n")


def spread(values: list[float], digits: int = 4) -> dict:
    """Median, min and max of a list."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def paired(a: list[float], b: list[float]) -> dict:
    """Median (and range) of the per-round ratios a[i] / b[i]: each pair ran in the same round, so drift
    of the machine between rounds cancels, which a ratio of medians would not do."""
    return spread([x / y for x, y in zip(a, b, strict=True)])


# ------------------------------------------------------------------------------------------ environment


def pick_device(choice: str) -> torch.device:
    """The device: `auto` takes CUDA when there is one."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    return torch.device(choice)


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def version(package: str) -> str | None:
    """Installed version of a distribution, without importing it."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU (the CPU run checks the logic, not bf16 numerics)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock time covers the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------- model, vector


def llama_config(size: Size) -> LlamaConfig:
    """A Llama config of `size` (untied embeddings, SDPA attention, no dropout)."""
    return LlamaConfig(hidden_size=size.hidden, num_hidden_layers=size.layers, num_attention_heads=size.heads,
                       num_key_value_heads=size.kv_heads, intermediate_size=size.intermediate,
                       vocab_size=size.vocab, max_position_embeddings=max(size.seq, 128),
                       tie_word_embeddings=False, attention_dropout=0.0, attn_implementation="sdpa")


def build_backbone(config: LlamaConfig, device: torch.device, seed: int) -> LlamaForCausalLM:
    """A random-init Llama, built directly on `device`.

    Weights stay fp32 (the master copy) and only the matmuls run in bf16 under autocast: W + dW - dW is
    then exact up to fp32 rounding (~1e-7 of |W|). With bf16 weights the fold and the strip would each
    round to 8 mantissa bits (~0.4 %), and small optimizer updates would vanish in the rounding.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.float().train()


def targets(model: torch.nn.Module) -> list[str]:
    """Names of the linear layers the vector covers (all 7 projections of every layer)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS]


def make_vector(model: torch.nn.Module, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A random rank-8 vector: (A, B) per target layer, dW = B @ A * SCALING.

    B is non-zero on purpose (peft initialises it to zero): a zero dW would make every arm and every strip
    look equivalent. Its scale puts dW at tens of percent of the weights' own scale, so a wrong strip shows.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    vector = {}
    for name in targets(model):
        weight = model.get_submodule(name).weight
        out_features, in_features = weight.shape
        a = torch.randn(RANK, in_features, generator=generator) / in_features**0.5
        b = torch.randn(out_features, RANK, generator=generator) * 0.02
        vector[name] = (a.to(weight.device), b.to(weight.device))
    return vector


@torch.no_grad()
def fold(model: torch.nn.Module, vector: dict, sign: float) -> None:
    """W += sign * B @ A * SCALING on every target layer (sign -1 strips what sign +1 folded in)."""
    for name, (a, b) in vector.items():
        weight = model.get_submodule(name).weight
        weight.add_((b @ a).to(weight.dtype), alpha=sign * SCALING)


def attach_adapter(model: LlamaForCausalLM, vector: dict):
    """`model` with the vector as a peft LoRA adapter: adapter frozen, every backbone weight trainable."""
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, (a, b) in vector.items():
            layer = inner.get_submodule(name)
            if layer.scaling["default"] != SCALING:
                raise RuntimeError(f"peft scaling {layer.scaling['default']} != {SCALING}")
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    for name, param in peft_model.named_parameters():  # peft froze the backbone; the vector is what stays
        param.requires_grad = "lora_" not in name
    return peft_model.train()


def count_params(model: torch.nn.Module) -> dict:
    """Backbone parameters: all, and those in matmuls (all but the input embedding, a lookup)."""
    backbone = {n: p.numel() for n, p in model.named_parameters() if "lora_" not in n}
    embed = sum(v for n, v in backbone.items() if "embed_tokens" in n)
    return {"params": sum(backbone.values()), "matmul_params": sum(backbone.values()) - embed}


# ------------------------------------------------------------------------------------------------ train


def make_batches(n: int, size: Size, seed: int, device: torch.device) -> list[torch.Tensor]:
    """`n` batches of random token ids (the same for every arm), already on the device."""
    generator = torch.Generator().manual_seed(seed + 2)
    shape = (size.batch, size.seq)
    return [torch.randint(size.vocab, shape, generator=generator).to(device) for _ in range(n)]


def make_optimizer(model: torch.nn.Module, kind: str, lr: float, device: torch.device):
    """AdamW (fused on CUDA) or SGD over the trainable parameters only (the frozen vector excluded).

    No weight decay: in the merged arm it would also decay the folded-in dW, so the strip would no longer
    give back what the adapter arm trains.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=device.type == "cuda")


def train_step(model, optimizer, ids: torch.Tensor, device: torch.device) -> None:
    """One causal-LM step on `ids` (labels = inputs, shifted inside the model)."""
    with autocast(device):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class Arm:
    """A model being fine-tuned, its optimizer, and how to get its clean backbone back."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    strip: Callable[[], torch.nn.Module]
    setup_s: float = 0.0  # copying the template, plus attaching (adapter) or folding in (merged) the vector


def make_arm(name: str, template: LlamaForCausalLM, vector: dict, device: torch.device, optim: str = "adamw",
             lr: float = LR, strip_scale: float = 1.0) -> Arm:
    """An arm from a copy of `template` (same initial weights for every arm).

    `strip_scale` other than 1 strips only part of the merged vector: a deliberately broken strip, to show
    that the equivalence check catches one.
    """
    start = time.perf_counter()
    model = copy.deepcopy(template)
    if name == "guarded_adapter":
        model = attach_adapter(model, vector)
        strip = model.unload  # drops the LoRA layers without merging them: the clean backbone
    elif name == "guarded_merged":
        fold(model, vector, +1.0)

        def strip(model=model):
            fold(model, vector, -strip_scale)
            return model
    else:
        def strip(model=model):
            return model
    sync(device)
    return Arm(name, model, make_optimizer(model, optim, lr, device), strip, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------ equivalence


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits, no autocast: the comparison then measures the backbones, not bf16 noise."""
    was_training = model.training
    model.eval()
    out = model(input_ids=ids).logits.float()
    model.train(was_training)
    return out


def sci(x: float) -> float:
    """`x` to 4 significant digits (for the JSON lines)."""
    return float(f"{x:.3e}")


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> dict:
    """max |a - b|, and that over max |b|."""
    gap = (a.float() - b.float()).abs().max().item()
    return {"max_abs": sci(gap), "relative": sci(gap / max(b.float().abs().max().item(), 1e-30))}


@torch.no_grad()
def vector_unchanged(peft_model, vector: dict) -> bool:
    """Whether the adapter still holds exactly the vector it started with (it was frozen)."""
    inner = peft_model.base_model.model
    return all(torch.equal(inner.get_submodule(name).lora_A["default"].weight, a)
               and torch.equal(inner.get_submodule(name).lora_B["default"].weight, b)
               for name, (a, b) in vector.items())


@torch.no_grad()
def param_gap(model: torch.nn.Module, reference: torch.nn.Module) -> dict:
    """The worst tensor's gap, relative to its own scale (max |W| of `reference`), and its largest gap."""
    ref = dict(reference.named_parameters())
    gaps = {name: relative_gap(param, ref[name]) for name, param in model.named_parameters()}
    worst = max(gaps, key=lambda name: gaps[name]["relative"])
    return {"max_abs": max(g["max_abs"] for g in gaps.values()), "relative": gaps[worst]["relative"],
            "param": worst}


def train_modes(template, vector, batches, device, optim: str, lr: float, seed: int,
                strip_scale: float) -> dict[str, Arm]:
    """Adapter and merged mode trained from the same weights on the same batches, in the same order."""
    arms = {name: make_arm(name, template, vector, device, optim, lr, strip_scale)
            for name in ("guarded_adapter", "guarded_merged")}
    for arm in arms.values():
        torch.manual_seed(seed)  # no dropout, so nothing random is drawn; seeded all the same
        for ids in batches:
            train_step(arm.model, arm.optimizer, ids, device)
    return arms


def equivalence(template: LlamaForCausalLM, vector: dict, batches: list[torch.Tensor], probe: torch.Tensor,
                device: torch.device, optim: str, lr: float, tol: float, seed: int,
                strip_scale: float = 1.0) -> dict:
    """Train adapter and merged modes from the same weights on the same batches, strip, compare.

    In exact arithmetic both give the same backbone (the gradient w.r.t. W is the same whether dW sits in
    W or beside it); what is left is rounding. Also reported: the forward gap before training (is the
    vector applied the same way?), whether the adapter stayed frozen, how far training moved the weights
    (the check means something only if they moved), and a control, the merged backbone with the vector
    still in, which must fail.
    """
    before_adapter = logits(attach_adapter(copy.deepcopy(template), vector), probe)
    merged_start = copy.deepcopy(template)
    fold(merged_start, vector, +1.0)
    before = relative_gap(logits(merged_start, probe), before_adapter)
    del before_adapter, merged_start
    arms = train_modes(template, vector, batches, device, optim, lr, seed, strip_scale)
    frozen = vector_unchanged(arms["guarded_adapter"].model, vector)
    adapter = arms["guarded_adapter"].strip()
    control = param_gap(arms["guarded_merged"].model, adapter)
    merged = arms["guarded_merged"].strip()
    params = param_gap(merged, adapter)
    logit_gap = relative_gap(logits(merged, probe), logits(adapter, probe))
    worst = max(params["relative"], logit_gap["relative"], before["relative"])
    return {"kind": "equivalence", "passed": worst <= tol and control["relative"] > tol and frozen,
            "tolerance_relative": tol, "steps": len(batches), "optimizer": optim, "lr": lr,
            "strip_scale": strip_scale, "forward_before_training": before,
            "vector_unchanged_by_training": frozen,
            "params": params, "logits": logit_gap, "training_moved_weights": param_gap(adapter, template),
            "control_vector_left_in": {**control, "detected": control["relative"] > tol},
            "note": "relative: max |diff| / max |reference|, per tensor (the worst one) for params; "
                    "logits in fp32 on a probe batch"}


# ------------------------------------------------------------------------------------------- throughput


def peak_memory(device: torch.device, baseline: int) -> tuple[int | None, str | None]:
    """Bytes this arm added at its peak (everything allocated above `baseline`), or None and why."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - baseline, None
    return None, "CPU: no per-arm allocator peak (ru_maxrss only rises, so a per-arm delta would mislead)"


def build_arms(template, vector, batches, device, warmup: int) -> tuple[dict[str, Arm], dict]:
    """Build the arms one after another, run their warm-up steps, and record each one's peak memory.

    The peak is max_memory_allocated (reset before the arm is built) minus what was allocated just before:
    the arm's weights, gradients, optimizer state and activations, not the arms built before it.
    """
    arms, memory = {}, {}
    for name in ARMS:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        arm = make_arm(name, template, vector, device)
        for step in range(max(warmup, 1)):  # at least one: AdamW allocates its state at the first step
            train_step(arm.model, arm.optimizer, batches[step % len(batches)], device)
        sync(device)
        memory[name] = peak_memory(device, baseline)
        arms[name] = arm
    return arms, memory


def timed_round(arm: Arm, batches: list[torch.Tensor], steps: int, device: torch.device) -> float:
    """Tokens per second of `steps` steps (the same batches for every arm)."""
    sync(device)
    start = time.perf_counter()
    for step in range(steps):
        train_step(arm.model, arm.optimizer, batches[step % len(batches)], device)
    sync(device)
    return steps * batches[0].numel() / (time.perf_counter() - start)


def alternate(arms: dict[str, Arm], batches, steps: int, rounds: int, device,
              budget: Budget) -> tuple[dict[str, list[float]], str | None]:
    """Every arm once per round, the order rotated each round so drift hits all arms alike.

    Stops before a round that would overrun the budget (after at least one round) and says why.
    """
    names, tps = list(arms), {name: [] for name in arms}
    round_s = []
    for r in range(rounds):
        if round_s and not budget.allows(statistics.mean(round_s)):
            return tps, f"--max-seconds {budget.seconds:g}: stopped after {r} of {rounds} rounds"
        start = time.perf_counter()
        for name in names[r % len(names):] + names[: r % len(names)]:
            tps[name].append(timed_round(arms[name], batches, steps, device))
        round_s.append(time.perf_counter() - start)
    return tps, None


def flops_per_token(config: LlamaConfig, matmul_params: int, seq: int) -> int:
    """Training FLOPs per token: 6 N + 12 L h T (PaLM, appendix B).

    6 N: forward (2) and backward (4) FLOPs of every matmul weight (N leaves out the input embedding, a
    lookup). 12 L h T: the attention scores and their weighted sum, T the sequence length, counted in full
    although causal kernels skip the masked half. The same model FLOPs count for every arm, so the
    adapter's extra matmuls show as lower MFU rather than as more useful work.
    """
    return 6 * matmul_params + 12 * config.num_hidden_layers * config.hidden_size * seq


def device_peak(device: torch.device, name: str, override: float | None) -> tuple[float | None, str]:
    """Dense bf16 peak FLOP/s of the device and where the figure comes from (None: unknown)."""
    if override:
        return override * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "CPU: no bf16 tensor-core peak to compare with (pass --peak-tflops to set one)"
    keys = sorted((k for k in PEAK_BF16 if k.lower() in name.lower()), key=len, reverse=True)
    if not keys:
        return None, f"unknown device {name!r}: pass --peak-tflops"
    return PEAK_BF16[keys[0]], f"table entry {keys[0]!r} (dense bf16)"


def arm_record(name: str, arm: Arm, tps: list[float], memory: tuple, flops: int, peak: tuple) -> dict:
    """The JSON line of one arm: throughput, MFU, peak memory."""
    achieved = flops * statistics.median(tps)
    peak_flops, peak_source = peak
    bytes_, memory_reason = memory
    params = list(arm.model.parameters())
    return {"kind": "arm", "arm": name, "tokens_per_s": spread(tps, 1),
            "rounds_tokens_per_s": [round(t, 1) for t in tps],
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "frozen_params": sum(p.numel() for p in params if not p.requires_grad),
            "achieved_tflops": round(achieved / 1e12, 3),
            "mfu": None if peak_flops is None else round(achieved / peak_flops, 4),
            "mfu_reason": None if peak_flops else peak_source,
            "peak_source": peak_source if peak_flops else None, "peak_memory_bytes": bytes_,
            "peak_memory_gib": None if bytes_ is None else round(bytes_ / 2**30, 3),
            "memory_reason": memory_reason, "setup_s": round(arm.setup_s, 3)}


def memory_ratio(memory: dict, name: str) -> float | None:
    """Peak memory of an arm over plain's (None when not measured)."""
    mine, plain = memory[name][0], memory["plain"][0]
    return None if mine is None or not plain else round(mine / plain, 4)


def throughput(template, vector, config, size: Size, args, device, budget: Budget, emit) -> bool:
    """Time the three arms; emit one line per arm and the ratios line. True when rounds were cut short."""
    batches = make_batches(min(args.steps, 8), size, args.seed, device)
    arms, memory = build_arms(template, vector, batches, device, args.warmup)
    tps, truncated = alternate(arms, batches, args.steps, args.rounds, device, budget)
    start = time.perf_counter()
    arms["guarded_merged"].strip()  # the vector leaves the merged arm's weights, as after real training
    sync(device)
    strip_s = time.perf_counter() - start
    peak = device_peak(device, device_name(device), args.peak_tflops)
    flops = flops_per_token(config, count_params(template)["matmul_params"], size.seq)
    for name in ARMS:
        record = arm_record(name, arms[name], tps[name], memory[name], flops, peak)
        extra = {"strip_s": round(strip_s, 4)} if name == "guarded_merged" else {}
        emit({**record, "steps_per_round": args.steps, "tokens_per_step": size.batch * size.seq, **extra})
    emit({"kind": "ratios", "rounds": len(tps["plain"]), "rounds_requested": args.rounds,
          "truncated": truncated is not None, "truncation_reason": truncated,
          "tokens_per_s": {f"{name}_over_plain": paired(tps[name], tps["plain"]) for name in ARMS[1:]},
          "peak_memory": {f"{name}_over_plain": memory_ratio(memory, name) for name in ARMS[1:]},
          "flops_per_token": flops, "flops_formula": "6 * matmul_params + 12 * layers * hidden * seq (PaLM)",
          "note": "tokens/s ratios: median (and range) of per-round ratios; arms alternate in each round"})
    return truncated is not None


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--device", choices=("auto", "cuda", "cpu"), default="auto")
    add("--size", choices=tuple(SIZES), default="medium")
    add("--rounds", type=int, default=7, help="timed rounds (every arm once per round)")
    add("--steps", type=int, default=20, help="optimizer steps per arm per round")
    add("--warmup", type=int, default=3, help="untimed steps per arm before the rounds")
    add("--batch", type=int, help="sequences per step (default: the size's)")
    add("--seq", type=int, help="tokens per sequence (default: the size's)")
    add("--seed", type=int, default=0)
    add("--peak-tflops", type=float, help="dense peak TFLOP/s for MFU (overrides the table)")
    add("--max-seconds", type=float, default=360.0,
        help="budget for the run after imports: the timed rounds stop early to keep it, and say so")
    add("--equiv-steps", type=int, default=8, help="training steps of the equivalence check")
    add("--equiv-optim", choices=("sgd", "adamw"), default="sgd",
        help="sgd keeps rounding gaps proportional to the gradients; adamw normalises each update, so a "
             "near-zero gradient whose sign rounding flips moves a weight by a full lr in one mode only")
    add("--equiv-lr", type=float, default=0.05)
    add("--equiv-tol", type=float,
        help="relative tolerance (default: 1e-5 fp32 on CPU, 1e-4 with adamw, 1e-2 bf16 autocast)")
    add("--out", type=Path, help="also write the JSON lines to this file")
    args = parser.parse_args(argv)
    if min(args.rounds, args.steps, args.equiv_steps) < 1 or args.warmup < 0:
        parser.error("--rounds, --steps and --equiv-steps must be at least 1, --warmup at least 0")
    return args


def cuda_facts(device: torch.device) -> dict:
    """CUDA version, compute capability, memory and bf16 support of the device ({} on CPU)."""
    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    return {"cuda": torch.version.cuda, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "bf16_supported": torch.cuda.is_bf16_supported()}


def environment(args, size: Size, device: torch.device, template, vector) -> dict:
    """The first line: versions, device, dtype policy, sizes."""
    vector_params = sum(a.numel() + b.numel() for a, b in vector.values())
    return {"kind": "env", "python": platform.python_version(), "torch": torch.__version__,
            "transformers": version("transformers"), "peft": version("peft"),
            "accelerate": version("accelerate"), "device": device.type, "device_name": device_name(device),
            **cuda_facts(device), "torch_threads": torch.get_num_threads(),
            "dtype": "fp32 master weights, bf16 autocast" if device.type == "cuda" else "fp32",
            **count_params(template), "size": args.size, "config": asdict(size),
            "vector": {"rank": RANK, "alpha": ALPHA, "scaling": SCALING, "targets": list(TARGETS),
                       "layers": len(vector), "params": vector_params},
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}


def run(args: argparse.Namespace, emit: Emitter) -> int:
    """The whole benchmark; the exit status."""
    budget = Budget(args.max_seconds)
    device = pick_device(args.device)
    base = SIZES[args.size]
    size = Size(**{**asdict(base), "batch": args.batch or base.batch, "seq": args.seq or base.seq})
    config = llama_config(size)
    start = time.perf_counter()
    template = build_backbone(config, device, args.seed)
    vector = make_vector(template, args.seed)
    sync(device)
    build_s = round(time.perf_counter() - start, 2)
    emit({**environment(args, size, device, template, vector), "build_s": build_s})
    emit.phase = "equivalence"
    # AdamW amplifies rounding in tiny gradients (tests/test_gpu_check.py): a looser fp32 default for it
    tol = args.equiv_tol or (1e-2 if device.type == "cuda" else 1e-4 if args.equiv_optim == "adamw" else 1e-5)
    batches = make_batches(args.equiv_steps + 1, size, args.seed + 10, device)
    check = equivalence(template, vector, batches[:-1], batches[-1], device, args.equiv_optim, args.equiv_lr,
                        tol, args.seed)
    emit(check)
    del batches
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the check's models are gone: hand their blocks back before the arms
    emit.phase = "throughput"
    truncated = throughput(template, vector, config, size, args, device, budget, emit)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    emit({"kind": "done", "seconds": round(budget.elapsed(), 1), "equivalence_passed": check["passed"],
          "truncated": truncated, "process_peak_rss_bytes": peak_rss})
    return 0 if check["passed"] else 3


def main(argv: Iterable[str] | None = None) -> int:
    """Run, and turn a failure into a JSON error line and a non-zero status (2: out of memory)."""
    args = parse_args(argv)
    emit = Emitter(args.out)
    try:
        return run(args, emit)
    except Exception as exc:  # noqa: BLE001  the caller parses stdout: say what broke as a JSON line
        traceback.print_exc()
        # torch.OutOfMemoryError, or a cuBLAS/cuDNN allocation failure raised as a plain RuntimeError
        oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
        emit({"kind": "error", "error": "out_of_memory" if oom else type(exc).__name__, "phase": emit.phase,
              "message": str(exc)[:2000], **({"hint": "a smaller --size, --batch or --seq"} if oom else {})})
        return 2 if oom else 1


if __name__ == "__main__":
    sys.exit(main())
