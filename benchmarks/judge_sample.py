"""The labelled sample of benchmarks/judge_agreement.py: where each reply comes from, and how it was drawn.

A reply is named by a `ref`, never copied into the repo (the shared files' licences forbid shipping them):
- a reply of the bow judge's corpus: its reader's `source` (`<file>:<line>` or `<file>#<record>`), drawn
  only from the share the judge holds out of its training (`secvec.judges.holdout_split`, the pipeline's
  `JUDGE_HOLDOUT`), so no item of the sample was ever trained on;
- an hh-rlhf `chosen` reply (never in the corpus): `<file>:<line>#chosen`;
- a SmolLM2-135M-Instruct reply generated here (`smollm2:<id>`): its text is stored in
  `judge_agreement_smollm2.jsonl`, with the `ref` of its prompt.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

from secvec.data.judge_corpus import judge_corpus
from secvec.data.public import (
    ADVBENCH_REFUSALS,
    ALPACA,
    DOLLY,
    HH_RLHF,
    JBB,
    STL,
    XSTEST,
    read_advbench_behaviors,
    read_advbench_refusals,
    read_benign_instructions,
    read_donotanswer,
    read_hh_rlhf,
    read_jbb,
    read_redinstruct,
    read_safety_tuned_llamas,
    read_xstest,
)
from secvec.data.schema import read_jsonl
from secvec.judges import holdout_split
from secvec.text import fold

GENERATED = Path(__file__).with_name("judge_agreement_smollm2.jsonl")
CHOSEN = "#chosen"

# Readers in the order judge_corpus reads them (its first occurrence of a reply is the one it keeps).
CORPUS_READERS: tuple[Callable[[Path], list[dict]], ...] = (
    read_hh_rlhf, read_jbb, read_safety_tuned_llamas, read_advbench_refusals, read_benign_instructions)
# Prompt readers whose records a generated reply's `prompt_ref` may name.
PROMPT_READERS: tuple[Callable[[Path], list[dict]], ...] = (
    read_advbench_behaviors, read_donotanswer, read_redinstruct, lambda s: read_xstest(s, "safe"))


def reply_sha256(text: str) -> str:
    """The identity of a labelled reply (16 hex digits): a label never silently moves to another text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _reply(record: dict) -> str:
    return record["messages"][-1]["content"]


def judge_split(shared: Path, holdout: float) -> tuple[dict[str, str], set[str]]:
    """({ref: reply} of the judge's held-out replies, the folded texts it trains on)."""
    texts, _ = judge_corpus(shared)
    held, fit = holdout_split(len(texts), holdout)
    ref_of: dict[str, str] = {}
    for reader in CORPUS_READERS:
        for record in reader(shared):
            ref_of.setdefault(fold(_reply(record)), record["source"])
    return {ref_of[fold(texts[i])]: texts[i] for i in held}, {fold(texts[i]) for i in fit}


def hh_chosen(shared: Path) -> dict[str, str]:
    """hh-rlhf harmless-base `chosen`: the last Assistant turn of each dialogue, by `<file>:<line>#chosen`."""
    out = {}
    for line, obj in read_jsonl(shared / HH_RLHF, HH_RLHF):
        replies = re.split(r"\n\nAssistant: ", obj.get("chosen") or "")
        reply = replies[-1].split("\n\nHuman: ")[0].strip() if len(replies) > 1 else ""
        if reply:
            out[f"{HH_RLHF}:{line}{CHOSEN}"] = reply
    return out


def prompts_by_ref(shared: Path) -> dict[str, str]:
    return {r["source"]: r["messages"][0]["content"] for reader in PROMPT_READERS for r in reader(shared)}


def generated_replies(path: Path = GENERATED) -> dict[str, dict]:
    """The stored SmolLM2 replies by `smollm2:<id>`; {} when none were generated."""
    if not path.is_file():
        return {}
    return {f"smollm2:{o['id']}": o for _, o in read_jsonl(path, path.name)}


def source_of(ref: str) -> str:
    """The group a ref is drawn and reported in: jbb, hh_rejected, hh_chosen, stl, advbench_refusals, benign,
    smollm2."""
    if ref.startswith("smollm2:"):
        return "smollm2"
    if ref.endswith(CHOSEN):
        return "hh_chosen"
    for prefix, name in ((JBB, "jbb"), (HH_RLHF, "hh_rejected"), (STL, "stl"),
                         (ADVBENCH_REFUSALS, "advbench_refusals"), (ALPACA, "benign"), (DOLLY, "benign")):
        if ref.startswith(prefix):
            return name
    raise ValueError(f"unknown reply ref {ref!r}")


# The draw that chose the shared-data part of judge_labels.jsonl (seed 0), in the file's order.
DRAWN = {"jbb": 36, "hh_rejected": 36, "hh_chosen": 32, "stl": 28, "advbench_refusals": 20, "benign": 16}


def draw(shared: Path, holdout: float, per_source: dict[str, int], seed: int = 0) -> list[str]:
    """The refs the labelled sample was drawn as: `per_source[group]` seeded picks from each group of the
    judge's held-out replies and the hh-rlhf `chosen` replies it never trains on."""
    held, trained = judge_split(shared, holdout)
    pool = {**held, **{r: t for r, t in hh_chosen(shared).items() if fold(t) not in trained}}
    rng, out = random.Random(seed), []
    for group, n in per_source.items():
        out += rng.sample(sorted(r for r in pool if source_of(r) == group), n)
    return out


def generate_smollm2(shared: Path, plan: dict[str, int], max_new_tokens: int, seed: int, out: Path = GENERATED,
                     batch_size: int = 8) -> list[dict]:
    """Greedy SmolLM2-135M-Instruct replies to seeded picks of prompts not asked before (`plan`: prompt file
    prefix -> n), appended to `out` as JSON lines {id, split, prompt_ref, max_new_tokens, reply}.
    `calibration` picks (red-instruct) are only for looking at thresholds; `eval` ones are labelled."""
    from secvec.convert import load_gguf, packaged_gguf
    from secvec.generate import generate

    done = generated_replies(out)
    asked = {o["prompt_ref"] for o in done.values()}
    prompts, rng, picks = prompts_by_ref(shared), random.Random(seed), []
    for prefix, n in plan.items():
        pool = sorted(r for r in prompts if r.startswith(prefix) and r not in asked)
        picks += [(prefix, ref) for ref in rng.sample(pool, n)]
    model, tokenizer = load_gguf(packaged_gguf())
    replies = generate(model, tokenizer, [[{"role": "user", "content": prompts[ref]}] for _, ref in picks],
                       max_new_tokens, batch_size)
    rows = [{"id": f"{len(done) + i:03d}", "split": "calibration" if "redinstruct" in prefix else "eval",
             "prompt_ref": ref, "max_new_tokens": max_new_tokens, "reply": reply}
            for i, ((prefix, ref), reply) in enumerate(zip(picks, replies, strict=True))]
    with out.open("a", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return rows


# The two rounds that wrote judge_agreement_smollm2.jsonl (about 3 min each on 2 shared cores, 1 thread).
ROUNDS = (
    ({"harmful_prompts/advbench": 12, "harmful_prompts/donotanswer": 12, XSTEST: 8,
      "harmful_prompts/redinstruct": 16}, 96, 0),
    ({"harmful_prompts/advbench": 12, "harmful_prompts/donotanswer": 12}, 192, 1),
)

if __name__ == "__main__":  # one-off: python benchmarks/judge_sample.py generate ROUND
    import os
    import sys

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # the GGUF is read from the installed wheel only
        os.environ.setdefault(key, "1")
    import torch

    from secvec.paths import shared_dir

    if len(sys.argv) != 3 or sys.argv[1] != "generate" or sys.argv[2] not in ("0", "1"):
        sys.exit("usage: python benchmarks/judge_sample.py generate 0|1")
    torch.set_num_threads(1)
    plan, max_new_tokens, seed = ROUNDS[int(sys.argv[2])]
    print(len(generate_smollm2(shared_dir(), plan, max_new_tokens, seed)), "replies added to", GENERATED)
