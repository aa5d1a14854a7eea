"""An untrained micro chat model saved as a real Hugging Face directory, for registry tests.

A registered version is an MLflow transformers model, so registration loads what it registers: tests need
a model directory transformers can load (config, safetensors, a tokenizer with a chat template), not bare
tensors. Untrained: building one takes well under a second.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

TEXTS = ["How do I bake a cake today?", "I'm sorry, but I can't help with that.", "Sort these numbers: 3 1 2"]


@cache
def _tokenizer():
    from secvec.bootstrap import build_tokenizer

    return build_tokenizer(TEXTS * 10, 512)


def write_chat_model(path: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """Save a micro Llama (weights from `seed`) with its tokenizer to `path`; `max_shard_size` (e.g. "200KB")
    splits the weights over several safetensors files and an index, as large models are."""
    from secvec.bootstrap import build_model

    tokenizer = _tokenizer()
    model = build_model(tokenizer, "micro", seed=seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(path)
    return Path(path)
