"""Chat examples -> token ids with response-only labels, and the padding collator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# The chat format of the bases bootstrapped here (secvec.bootstrap, secvec.minilm): each turn is
# <|role|>content<|end|>; generation stops at <|end|>.
PAD, EOT = "<|pad|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
IGNORE_INDEX = -100
WORD_JOINER = "\u2060"  # invisible; breaks a special-token string so the tokenizer reads it as text


def special_token_strings(tokenizer) -> list[str]:
    """Every special token's text (eos, pad, role markers such as <|im_start|> or <|eot_id|>)."""
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    return sorted(set(tokenizer.all_special_tokens) | set(added), key=len, reverse=True)


def escape_special_tokens(text: str, specials: list[str]) -> str:
    """Make special-token strings inside data inert, so a record cannot forge a turn or end one early."""
    for token in specials:
        if token and token in text:
            text = text.replace(token, token[0] + WORD_JOINER + token[1:])
    return text


def _template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    specials = special_token_strings(tokenizer)
    safe = [{**m, "content": escape_special_tokens(m["content"], specials)} for m in messages]
    ids = tokenizer.apply_chat_template(
        safe, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    return list(ids)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the prompt turns followed by the assistant header (what generation starts from)."""
    return _template_ids(tokenizer, messages, add_generation_prompt=True)


def encode_chat(tokenizer, messages: list[dict], max_length: int) -> dict[str, list[int]]:
    """Encode a chat whose last turn is the assistant's target; only that turn carries labels.

    Raises:
        ValueError: the chat does not end with an assistant turn, or the template does not render the
            prompt as a prefix of the full chat (labels would be misaligned).
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training example must end with an assistant message")
    prompt = prompt_ids(tokenizer, messages[:-1])
    full = _template_ids(tokenizer, messages, add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise ValueError("chat template does not render the prompt as a prefix of the full conversation")
    labels = [IGNORE_INDEX] * len(prompt) + full[len(prompt) :]
    # Keep the start of the response (where a refusal is decided): drop prompt tokens from the left.
    overflow = len(full) - max_length
    if overflow > 0:
        cut = min(overflow, max(len(prompt) - 1, 0))
        full, labels = full[cut:], labels[cut:]
        full, labels = full[:max_length], labels[:max_length]
    return {"input_ids": full, "labels": labels}


def encode_examples(tokenizer, examples: Sequence[dict], max_length: int) -> list[dict[str, list[int]]]:
    """Encode a list of schema examples (dicts with `messages`)."""
    if not examples:
        raise ValueError("no examples to encode (empty dataset)")
    return [encode_chat(tokenizer, ex["messages"], max_length) for ex in examples]


@dataclass
class PadCollator:
    """Right-pads a batch to its own longest sequence (dynamic padding, no wasted tokens).

    Keys ending in `input_ids` get `pad_id`, `labels` get IGNORE_INDEX; an attention mask is added per
    id tensor (`input_ids` -> `attention_mask`, `kl_input_ids` -> `kl_attention_mask`).
    """

    pad_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for key in features[0]:
            seqs = [f[key] for f in features]
            width = max(len(s) for s in seqs)
            fill = IGNORE_INDEX if key.endswith("labels") else self.pad_id
            batch[key] = torch.tensor([list(s) + [fill] * (width - len(s)) for s in seqs])
            if key.endswith("input_ids"):
                mask_key = key.replace("input_ids", "attention_mask")
                batch[mask_key] = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        return batch


def response_loss(logits: torch.Tensor, labels: torch.Tensor, first_k: int | None = None) -> torch.Tensor:
    """Per-example mean next-token loss over labelled (response) positions, optionally the first k only."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    if first_k is not None:
        mask = mask & (mask.cumsum(dim=1) <= first_k)
    token_loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.clamp(min=0).reshape(-1),
        reduction="none",
    ).view_as(shift_labels)
    return (token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token logits, their targets (ignored positions clamped to 0) and the response mask."""
    shift_labels = labels[:, 1:]
    return logits[:, :-1].float(), shift_labels.clamp(min=0), shift_labels != IGNORE_INDEX


def weighted_response_loss(logits: torch.Tensor, labels: torch.Tensor, first_tokens: int, weight: float) -> torch.Tensor:
    """Token-mean next-token loss over the batch's response tokens, the first `first_tokens` of each response
    weighing `weight` (weight 1: the plain token-mean language-model loss)."""
    logits, targets, mask = _shifted(logits, labels)
    token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    weights = mask * torch.where(mask.cumsum(dim=1) <= first_tokens, weight, 1.0)
    return (token_loss * weights).sum() / weights.sum().clamp(min=1)


def unlikelihood_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token mean of -log(1 - p(target)) over response tokens: pushes the responses' tokens away (Welleck et
    al. 2019's unlikelihood), bounded where a log-likelihood penalty would diverge."""
    logits, targets, mask = _shifted(logits, labels)
    p = torch.softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (-torch.log1p(-p.clamp(max=1 - 1e-6)) * mask).sum() / mask.sum().clamp(min=1)
