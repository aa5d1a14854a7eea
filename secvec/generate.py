"""Batched greedy generation from chat prompts: left padding, KV cache, results in input order."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from secvec.encoding import prompt_ids

log = logging.getLogger(__name__)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists to one width; returns (input_ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids, mask


def stop_ids(model, tokenizer) -> list[int]:
    """Ids that end a reply: the tokenizer's eos plus the model's own (some chat models have several)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


def _cut_at_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for pos, tok in enumerate(tokens):
        if tok in stops:
            return tokens[:pos]
    return tokens


def generate(
    model,
    tokenizer,
    conversations: Sequence[list[dict]],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    progress: bool = False,
) -> list[str]:
    """Greedy replies to chat prompts, decoded and stripped, in the order of `conversations`.

    Prompts are sorted by length before batching so that each batch carries little padding; padding is
    on the left so every row's next token follows its own last prompt token, and positions count from
    each row's first real token (models with absolute position embeddings, such as BERT, need them
    passed). Works for a plain transformers model and for a peft model.

    Args:
        model: a causal LM (or a PeftModel around one).
        tokenizer: its tokenizer, with a chat template and a pad token.
        conversations: prompt turns per item (no assistant reply); the assistant header is appended.
        max_new_tokens: reply length limit; generation also stops at eos.
        batch_size: prompts per `model.generate` call.
        progress: show a tqdm bar over batches.

    Returns:
        One reply string per conversation (special tokens removed, surrounding whitespace stripped).
    """
    if not conversations:
        return []
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [prompt_ids(tokenizer, messages) for messages in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stops = stop_ids(model, tokenizer)
    device = next(model.parameters()).device
    replies: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
                rows = order[start : start + batch_size]
                input_ids, attention_mask = left_pad([prompts[i] for i in rows], tokenizer.pad_token_id)
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0).to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    use_cache=True,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=stops,
                )
                new_tokens = output[:, input_ids.shape[1] :].tolist()
                for row, tokens in zip(rows, new_tokens, strict=True):
                    text = tokenizer.decode(_cut_at_stop(tokens, set(stops)), skip_special_tokens=True)
                    replies[row] = text.strip()
    finally:
        model.train(was_training)
    return replies
