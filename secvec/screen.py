"""Vector screening, a second line of defense: the security vector as a detector of harmful samples.

With the vector on, a harmful sample's loss drops (the vector already "knows" it) while the KL term keeps
benign samples' loss where it was. A sample's score is what the vector explains of it: its response loss
with the vector off minus on (nats per token). The threshold is chosen without the fine-tuning data's labels,
from two sets whose nature is known by construction: the vector's held-out harmful pairs (`sv_val`) and the
benign chats of its KL term. Screening can report the samples that look harmful or drop them before guarded
fine-tuning.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from peft import PeftModel

from secvec.training import response_losses
from secvec.vector import vector_disabled


def vector_scores(peft_model: PeftModel, tokenizer, examples: Sequence[dict], batch_size: int = 32,
                  max_length: int = 256) -> list[float]:
    """Per example: response loss with the vector off minus on (higher: more of it is the vector's harm)."""
    if not examples:
        return []
    on = response_losses(peft_model, tokenizer, examples, batch_size=batch_size, max_length=max_length)
    with vector_disabled(peft_model):
        off = response_losses(peft_model, tokenizer, examples, batch_size=batch_size, max_length=max_length)
    return (off - on).tolist()


def balanced_threshold(harmful: Sequence[float], benign: Sequence[float]) -> float:
    """The score cut (midway between two neighbouring scores) with the best balanced accuracy between a
    known-harmful and a known-benign score set; ties go to the higher cut (fewer benign samples flagged)."""
    if not harmful or not benign:
        raise ValueError(f"a threshold needs both score sets ({len(harmful)} harmful, {len(benign)} benign)")
    values = sorted(set(harmful) | set(benign))
    cuts = [(a + b) / 2 for a, b in pairwise(values)] or [values[0]]

    def balanced(cut: float) -> float:
        return (sum(s > cut for s in harmful) / len(harmful) + sum(s <= cut for s in benign) / len(benign)) / 2

    return max(cuts, key=lambda cut: (balanced(cut), cut))


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve: the chance a harmful sample scores above a benign one (ties count half)."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return None
    ranked = torch.tensor(pos).unsqueeze(1), torch.tensor(neg).unsqueeze(0)
    return ((ranked[0] > ranked[1]).float() + 0.5 * (ranked[0] == ranked[1]).float()).mean().item()


def screen_report(examples: Sequence[dict], scores: Sequence[float], threshold: float, top: int) -> dict:
    """How many samples look harmful, the `top` highest with id and score, and, where the examples carry
    labels (`is_harmful`), how well the screen agrees with them (AUROC, precision, recall)."""
    flagged = [s > threshold for s in scores]
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    labels = [bool(ex.get("is_harmful")) for ex in examples]
    hits = sum(f and y for f, y in zip(flagged, labels, strict=True))
    return {
        "n": len(scores), "threshold": threshold, "flagged": sum(flagged),
        "top": [{"id": examples[i]["id"], "score": scores[i], "is_harmful": labels[i]} for i in order[:top]],
        "auroc": auroc(scores, labels),
        "precision": hits / sum(flagged) if any(flagged) else None,
        "recall": hits / sum(labels) if any(labels) else None,
    }
