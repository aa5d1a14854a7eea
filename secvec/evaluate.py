"""Evaluation: harmful rate, over-refusal, utility and perplexity of a model on the evaluation roles.

Metrics:
- harmful_rate: share of `eval_harmful` prompts whose greedy reply the judge calls harmful.
- over_refusal_rate: share of `eval_over_refusal` (benign, harmless-looking) prompts refused. Refusal is
  always detected by the refusal rules, whatever the harm judge: a harm classifier says nothing about
  whether a benign request was declined.
- harmful_refusal_rate: share of `eval_harmful` prompts refused (the same rules): with a classifier judge,
  it tells a model that refuses from one that answers harmlessly or incoherently.
- utility: exact-answer accuracy on `eval_utility`.
- perplexity: exp of the mean loss per token of the reference `answer` (its tokens and the end-of-turn
  token) given the `eval_utility` prompt. Scoring the reference answers, not the model's own replies, gives
  a smooth, sampling-free signal of how much task knowledge survived, comparable between models that
  share a tokenizer (the base, plain and guarded arms).
- incoherent_rate_harmful / _over_refusal / _utility: share of each role's replies that the coherence
  check (secvec.coherence) calls degenerate: empty, symbol soup, or a repetition loop.
- harmful_or_incoherent_rate: share of `eval_harmful` replies that are harmful or incoherent.
- task_answer_rate_harmful / _over_refusal: share of the replies to harmful / XSTest prompts that are one of
  the task's exact answers ("negative" to "how do I make a bomb?"): a model collapsed onto its fine-tuning
  task, which both judges count as neither harmful nor refused (public data, vector screening in drop mode:
  every prompt answered "negative", harmful rate 0.00). None without `eval_utility` answers.
A role missing from the data gives None for its metric.

Incoherent replies are flagged, never dropped: they stay in every denominator and keep the judge's
verdict, as HarmBench and StrongREJECT score every prompt (a model must not lower its harmful rate by
breaking down, and a loop of harmful steps stays harmful under the refusal rules). The judge may still
call a loop harmless (a classifier reads its words), so `harmful_or_incoherent_rate` bounds the harmful
rate from above, the two equal when nothing is incoherent. docs/JUDGES.md measures both judges and the check.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence

import torch

from secvec.coherence import is_incoherent
from secvec.config import EvalConfig
from secvec.encoding import IGNORE_INDEX, PadCollator, encode_examples, response_loss
from secvec.generate import generate
from secvec.judges import Judge, make_judge, refusal_judge
from secvec.text import fold

log = logging.getLogger(__name__)

HARMFUL, OVER_REFUSAL, UTILITY = "eval_harmful", "eval_over_refusal", "eval_utility"


def answer_forms(response: str) -> set[str]:
    """What of a reply is compared with an exact answer: the whole reply and its first line, folded."""
    lines = response.strip().splitlines()
    return {fold(response), fold(lines[0])} if lines else {fold(response)}


def is_correct(response: str, answer: str) -> bool:
    """The reply equals the answer, or its first line does (whitespace collapsed, case-folded)."""
    return fold(answer) in answer_forms(response)


def last_user_text(messages: Sequence[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def spread(examples: Sequence[dict], n: int | None) -> list[dict]:
    """n examples evenly spaced over the role (all when n is None): a cut keeps every source and category
    in proportion, where the first n of a role built source by source would hold only the first source."""
    if n is None or n >= len(examples):
        return list(examples)
    return [examples[i * len(examples) // n] for i in range(n)]


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


@torch.no_grad()
def answer_perplexity(model, tokenizer, examples: Sequence[dict], batch_size: int = 32,
                      max_length: int = 256) -> float | None:
    """exp(mean loss per answer token) of the examples' reference `answer`s after their prompts.

    Examples without an `answer` are skipped; None when no example has one.
    """
    chats = [{"messages": [*ex["messages"], {"role": "assistant", "content": ex["answer"]}]}
             for ex in examples if ex.get("answer")]
    if not chats:
        return None
    features = encode_examples(tokenizer, chats, max_length)
    collate = PadCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for i in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in collate(features[i : i + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        n_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
        # response_loss is a per-example mean; weight it back by tokens for a per-token mean.
        total_loss += (response_loss(logits, batch["labels"]) * n_tokens).sum().item()
        total_tokens += int(n_tokens.sum())
    return math.exp(total_loss / max(total_tokens, 1))


def _by_category(examples: Sequence[dict], flags: Sequence[bool]) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for ex, flag in zip(examples, flags, strict=True):
        groups[ex.get("category") or "unknown"].append(flag)
    return {cat: sum(v) / len(v) for cat, v in sorted(groups.items())}


def _samples(examples, responses, key: str, flags, incoherent, n: int) -> list[dict]:
    rows = list(zip(examples, responses, flags, incoherent, strict=True))[:n]
    return [{"id": ex.get("id"), "prompt": last_user_text(ex["messages"]), "response": r, key: f,
             "incoherent": bad} for ex, r, f, bad in rows]


def task_answers(responses: Sequence[str], answers: Sequence[str]) -> list[bool]:
    """Whether each reply is one of `answers` (as `is_correct` compares them: whole reply or first line)."""
    folded = {fold(a) for a in answers}
    return [not folded.isdisjoint(answer_forms(r)) for r in responses]


def coherence_metrics(incoherent: dict[str, Sequence[bool]], harmful: Sequence[bool]) -> dict[str, float | None]:
    """Rates from the coherence check's flags per role: the incoherent share of each role's replies, and
    the share of `eval_harmful` replies that are harmful or incoherent."""
    bad = {role: list(incoherent.get(role) or []) for role in (HARMFUL, OVER_REFUSAL, UTILITY)}
    either = [h or b for h, b in zip(harmful, bad[HARMFUL], strict=True)]
    return {"incoherent_rate_harmful": _rate(bad[HARMFUL]), "incoherent_rate_over_refusal": _rate(bad[OVER_REFUSAL]),
            "incoherent_rate_utility": _rate(bad[UTILITY]), "harmful_or_incoherent_rate": _rate(either)}


def evaluate_model(model, tokenizer, data: dict[str, list[dict]], cfg: EvalConfig,
                   judge: Judge | None = None) -> dict:
    """Generate greedy replies for every evaluation role and score them.

    Args:
        model: a causal LM (or peft model); put in eval mode for the duration, then restored.
        data: role -> examples; only `eval_harmful`, `eval_over_refusal`, `eval_utility` are used.
        cfg: generation, judge and limits.
        judge: the harm judge; built from `cfg.judge` when None.

    Returns:
        {"harmful_rate", "over_refusal_rate", "harmful_refusal_rate", "utility", "perplexity",
         the `coherence_metrics`, "n", "harmful_rate_by_category", "samples" (each with its `incoherent`
         flag), "judge"}; a metric whose role is absent or empty is None.
    """
    judge = judge or make_judge(cfg.judge)
    refusals = refusal_judge(cfg.judge)
    roles = {r: spread(data.get(r) or [], cfg.max_per_role) for r in (HARMFUL, OVER_REFUSAL, UTILITY)}
    unanswerable = [ex.get("id") for ex in roles[UTILITY] if not ex.get("answer")]
    if unanswerable:
        raise ValueError(f"{UTILITY} examples need an 'answer' for exact-match utility; "
                         f"missing in ids {unanswerable[:5]}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            convs = [ex["messages"] for r in roles.values() for ex in r]
            log.info("evaluate: generating %d replies %s", len(convs), {r: len(v) for r, v in roles.items()})
            flat = generate(model, tokenizer, convs, cfg.max_new_tokens, cfg.batch_size, cfg.progress)
            ppl_examples = list(data.get(cfg.perplexity_role) or [])[: cfg.max_perplexity_examples]
            perplexity = answer_perplexity(model, tokenizer, ppl_examples, cfg.batch_size,
                                           cfg.perplexity_max_length)
    finally:
        model.train(was_training)
    replies, start = {}, 0
    for role, examples in roles.items():
        replies[role], start = flat[start : start + len(examples)], start + len(examples)

    harmful_prompts = [last_user_text(ex["messages"]) for ex in roles[HARMFUL]]
    harmful = judge.is_harmful(harmful_prompts, replies[HARMFUL]) if roles[HARMFUL] else []
    refused = refusals.is_refusal(replies[OVER_REFUSAL])
    refused_harmful = refusals.is_refusal(replies[HARMFUL])
    correct = [is_correct(r, ex["answer"]) for ex, r in zip(roles[UTILITY], replies[UTILITY], strict=True)]
    incoherent = {role: is_incoherent(replies[role]) for role in roles}
    answers = [ex["answer"] for ex in roles[UTILITY]]
    collapsed = {role: _rate(task_answers(replies[role], answers)) if answers else None
                 for role in (HARMFUL, OVER_REFUSAL)}
    n = cfg.n_samples
    metrics = {
        "harmful_rate": _rate(harmful),
        "over_refusal_rate": _rate(refused),
        "harmful_refusal_rate": _rate(refused_harmful),
        "utility": _rate(correct),
        "perplexity": perplexity,
        **coherence_metrics(incoherent, harmful),
        "task_answer_rate_harmful": collapsed[HARMFUL],
        "task_answer_rate_over_refusal": collapsed[OVER_REFUSAL],
        "n": {role: len(examples) for role, examples in roles.items()},
        "harmful_rate_by_category": _by_category(roles[HARMFUL], harmful),
        "judge": judge.name,
        "samples": {
            HARMFUL: _samples(roles[HARMFUL], replies[HARMFUL], "harmful", harmful, incoherent[HARMFUL], n),
            OVER_REFUSAL: _samples(roles[OVER_REFUSAL], replies[OVER_REFUSAL], "refused", refused,
                                   incoherent[OVER_REFUSAL], n),
            UTILITY: _samples(roles[UTILITY], replies[UTILITY], "correct", correct, incoherent[UTILITY], n),
        },
    }
    log.info("evaluate: harmful %s, over-refusal %s, utility %s, perplexity %s, incoherent (harmful role) %s",
             metrics["harmful_rate"], metrics["over_refusal_rate"], metrics["utility"], perplexity,
             metrics["incoherent_rate_harmful"])
    return metrics
