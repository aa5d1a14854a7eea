"""Safety alignment of a given pretrained chat model, before the method applies to it.

The method assumes an aligned base: the vector learns what alignment removed, and stripping it must leave a
model that refuses. A real small chat model (e.g. SmolLM2-135M-Instruct) may comply with harmful requests as
shipped, so it is first fine-tuned on the `align` role: refusals of harmful prompts and benign answers, the
same data the bootstrapped bases learn from.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from secvec.config import TrainConfig
from secvec.device import CPU, Hardware
from secvec.encoding import encode_examples
from secvec.models import load_causal_lm
from secvec.training import train

log = logging.getLogger(__name__)


def align_base(model_dir: str | Path, examples: Sequence[dict], cfg: TrainConfig, out_dir: str | Path,
               callbacks: Sequence = (), hardware: Hardware = CPU) -> list[dict]:
    """Fine-tune the whole model at `model_dir` on `align` chats (response tokens only), save it with its
    tokenizer to `out_dir`; returns the training log records."""
    if not examples:
        raise ValueError("align needs alignment examples (the 'align' role is empty)")
    refusals = sum(ex["is_harmful"] for ex in examples)
    if not refusals:
        raise ValueError("align: the 'align' role holds no harmful prompt with its refusal: nothing to align on")
    out = Path(out_dir)
    model, tokenizer = load_causal_lm(model_dir, device=hardware.device)  # float32 master weights
    log.info("align: %d chats (%d refusals of harmful prompts)", len(examples), refusals)
    features = encode_examples(tokenizer, examples, cfg.max_length)
    history = train(model, features, cfg, out.with_name(out.name + "-ckpt"), pad_id=tokenizer.pad_token_id,
                    callbacks=callbacks, hardware=hardware)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return history
