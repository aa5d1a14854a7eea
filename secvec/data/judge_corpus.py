"""The harm judge's training replies (`judge.kind: bow`), drawn from the public files, and their cache key."""

from __future__ import annotations

import hashlib
from pathlib import Path

from secvec.data.public import (
    ADVBENCH_REFUSALS,
    ALPACA,
    DOLLY,
    HH_RLHF,
    JBB,
    STL,
    read_advbench_refusals,
    read_benign_instructions,
    read_hh_rlhf,
    read_jbb,
    read_safety_tuned_llamas,
)
from secvec.text import fold

JUDGE_FILES = (HH_RLHF, JBB, STL, ADVBENCH_REFUSALS, ALPACA, DOLLY)


def judge_corpus(shared: Path) -> tuple[list[str], list[bool]]:
    """Replies labelled for the harm classifier (`judge.kind: bow`), each text once.

    Harmful: the replies of the harmful pairs (hh-rlhf `rejected`, JailbreakBench jailbroken). Not harmful:
    refusals (safety-tuned-llamas, AdvBench Llama-2-chat) and benign answers (Alpaca / Dolly).
    """
    harmful = read_hh_rlhf(shared) + read_jbb(shared)
    harmless = read_safety_tuned_llamas(shared) + read_advbench_refusals(shared) + read_benign_instructions(shared)
    seen: set[str] = set()
    texts, labels = [], []
    for label, records in ((True, harmful), (False, harmless)):
        for record in records:
            reply = record["messages"][-1]["content"]
            key = fold(reply)
            if key and key not in seen:
                seen.add(key)
                texts.append(reply)
                labels.append(label)
    return texts, labels


def judge_corpus_sha256(shared: Path) -> str:
    """sha256 over the files `judge_corpus` reads: the judge's cache key."""
    digest = hashlib.sha256()
    for name in JUDGE_FILES:
        digest.update(name.encode() + b"\0" + (shared / name).read_bytes())
    return digest.hexdigest()
