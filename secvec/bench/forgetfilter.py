"""ForgetFilter (Zhao et al. 2023): fine-tune the noisy model briefly on safe data, then drop the examples
whose replies it forgot the most (harmful ones, in the paper's finding) before fine-tuning again."""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from secvec.config import FinetuneConfig, ForgetFilterConfig
from secvec.device import CPU, Hardware
from secvec.generate import generate
from secvec.guarded import finetune
from secvec.models import load_causal_lm

_WORD = re.compile(r"\w+")


def _unigrams(text: str) -> Counter:
    return Counter(_WORD.findall(text.casefold()))


def rouge1(candidate: str, reference: str) -> float:
    """ROUGE-1 F1: unigram overlap of two texts (case-folded word tokens)."""
    cand, ref = _unigrams(candidate), _unigrams(reference)
    overlap = sum((cand & ref).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(cand.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def response_text(example: Mapping) -> str:
    return next(m["content"] for m in reversed(example["messages"]) if m["role"] == "assistant")


def forgetting_scores(model_before, model_after, tokenizer, examples: Sequence[dict], max_new_tokens: int,
                      batch_size: int = 64) -> list[float]:
    """Per example: ROUGE-1 of the greedy reply to its own response, before minus after safe fine-tuning.

    Examples that the safe data makes the model forget (harmful ones, in ForgetFilter's finding) score high.
    """
    prompts = [ex["messages"][:-1] for ex in examples]
    with torch.no_grad():
        before = generate(model_before, tokenizer, prompts, max_new_tokens, batch_size)
        after = generate(model_after, tokenizer, prompts, max_new_tokens, batch_size)
    return forgetting(before, after, [response_text(ex) for ex in examples], max_new_tokens)


def forgetting(before: Sequence[str], after: Sequence[str], responses: Sequence[str], max_words: int) -> list[float]:
    """ROUGE-1 of each reply to its response's first `max_words` words, before minus after.

    A reply of at most `max_words` tokens cannot match more: against a long response, recall alone would keep
    every score near 0.
    """
    refs = [" ".join(_WORD.findall(r)[:max_words]) for r in responses]
    return [rouge1(b, r) - rouge1(a, r) for b, a, r in zip(before, after, refs, strict=True)]


def forget_filter(examples: Sequence[dict], scores: Sequence[float], threshold: float) -> tuple[list[dict], dict]:
    """Keep the examples forgotten by at most `threshold`; the stats say how well harm was caught."""
    kept = [ex for ex, s in zip(examples, scores, strict=True) if s <= threshold]
    n_harmful = sum(ex["is_harmful"] for ex in examples)
    dropped_harmful = n_harmful - sum(ex["is_harmful"] for ex in kept)
    dropped = len(examples) - len(kept)
    return kept, {
        "threshold": threshold, "examples": len(examples), "kept": len(kept), "dropped": dropped,
        "harmful_recall": dropped_harmful / n_harmful if n_harmful else None,
        "precision": dropped_harmful / dropped if dropped else None,
        "benign_dropped": dropped - dropped_harmful,
        "mean_score": {"harmful": _mean([s for ex, s in zip(examples, scores, strict=True) if ex["is_harmful"]]),
                       "benign": _mean([s for ex, s in zip(examples, scores, strict=True) if not ex["is_harmful"]])},
    }


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def forgetfilter_select(noisy_dir: str | Path, examples: Sequence[dict], refusals: Sequence[dict],
                        cfg: ForgetFilterConfig, trainer_dir: str | Path,
                        hardware: Hardware = CPU) -> tuple[list[dict], dict]:
    """ForgetFilter on `examples` with the noisy model in `noisy_dir` (fine-tuned on them): a copy of it
    fine-tuned briefly on `refusals` (the safe data), then every example scored by how much of its response
    the copy forgot; those over `cfg.threshold` are dropped. Returns (kept examples, stats)."""
    noisy, tokenizer = load_causal_lm(noisy_dir, device=hardware.device)
    safe, _ = load_causal_lm(noisy_dir, device=hardware.device)
    finetune(safe, tokenizer, list(refusals)[: cfg.safe_examples], FinetuneConfig(train=cfg.safe_train),
             trainer_dir, hardware=hardware)
    scores = forgetting_scores(noisy, safe, tokenizer, examples, cfg.max_new_tokens)
    return forget_filter(examples, scores, cfg.threshold)
