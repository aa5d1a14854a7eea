"""Stripping (step 3 of the method): drop the security vector, keep what the backbone learned.

The vector is removed without merging; a task LoRA, if guarded fine-tuning used one, is merged into
the clean backbone. The result is checked against the plain architecture and the guarded model's own
outputs with the vector disabled.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel

from secvec.encoding import PadCollator, encode_examples
from secvec.guarded import TASK_ADAPTER
from secvec.vector import VECTOR_NAME, vector_disabled

log = logging.getLogger(__name__)

ADAPTER_MARKERS = ("lora_", VECTOR_NAME, "base_layer")


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids.to(next(model.parameters()).device)).logits.float().cpu()


def architecture_mismatches(model) -> list[str]:
    """Parameter names/shapes that differ from a freshly built model of the same config."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config)
    want = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))


def probe_batch(tokenizer, examples: Sequence[dict], max_length: int = 128) -> torch.Tensor:
    """A padded batch of token ids to compare the model's outputs on, before and after stripping."""
    features = encode_examples(tokenizer, examples, max_length)
    return PadCollator(tokenizer.pad_token_id)([{"input_ids": f["input_ids"]} for f in features])["input_ids"]


def strip_vector(model: PeftModel, probe_ids: torch.Tensor) -> tuple[torch.nn.Module, dict]:
    """Remove the vector (and merge a task LoRA); return the clean backbone and the strip check.

    Args:
        model: the guarded model (consumed: peft unloads in place).
        probe_ids: a batch of token ids to compare outputs on.

    Returns:
        (clean model, {"adapter_keys": [...], "architecture_mismatches": [...], "max_abs_diff": float,
         "passed": bool})
    """
    has_task = TASK_ADAPTER in model.peft_config
    with vector_disabled(model):
        expected = _logits(model, probe_ids)
    clean = model.merge_and_unload(adapter_names=[TASK_ADAPTER]) if has_task else model.unload()
    clean.eval()
    adapter_keys = [k for k in clean.state_dict() if any(m in k for m in ADAPTER_MARKERS)]
    mismatches = architecture_mismatches(clean)
    max_abs_diff = (expected - _logits(clean, probe_ids)).abs().max().item()
    # Merging a task LoRA re-associates a float32 sum, so allow float32 rounding there only.
    tolerance = 1e-4 if has_task else 1e-6
    check = {
        "adapter_keys": adapter_keys,
        "architecture_mismatches": mismatches,
        "max_abs_diff": max_abs_diff,
        "tolerance": tolerance,
        "passed": not adapter_keys and not mismatches and max_abs_diff <= tolerance,
    }
    log.info("strip: adapter keys %d, mismatches %d, max |diff| %.2e", len(adapter_keys), len(mismatches),
             max_abs_diff)
    return clean, check


def save_clean(model, tokenizer, out_dir: str | Path) -> Path:
    """Save the clean backbone as a plain Hugging Face model directory (safetensors + tokenizer)."""
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
