"""Readers of the public safety and utility files, and the `public` preset built from them.

The public files are read in place from `../shared/datasets` (beside the project root), a config's
`shared_datasets` or `$SECVEC_SHARED_DATASETS` (which wins); they are never copied into the repo. Every
reader returns records (`data.chat`) whose `source` is `<file>:<line>` or `<file>#<record>`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from secvec.config import DataConfig
from secvec.data.files import csv_dicts, csv_rows, join_parts, json_records, text_field
from secvec.data.schema import DataError, chat, normalize_prompt, prompt_text, read_jsonl, read_text
from secvec.paths import SHARED_ENV, shared_dir

SST2_PROMPT = "Classify the sentiment of this review as positive or negative: {}"
AGNEWS_PROMPT = "Classify the topic of this news article as World, Sports, Business or Science/Tech: {}"
HH_RLHF = "harmful_responses/hh_rlhf_harmless_base_test.jsonl"
JBB = "harmful_responses/jbb_jailbroken_responses.jsonl"
STL = "refusals/safety_tuned_llamas_safety_only.json"
ADVBENCH_REFUSALS = "refusals/advbench_llama2chat_refusals.csv"
ADVBENCH = "harmful_prompts/advbench_harmful_behaviors.csv"
XSTEST = "over_refusal/xstest_prompts.csv"
ALPACA, DOLLY = "benign/alpaca_safety_related_subset.json", "benign/dolly_safety_related_subset.jsonl"


# ---- public files -----------------------------------------------------------------------------------------


def read_hh_rlhf(shared: Path) -> list[dict]:
    """hh-rlhf harmless-base: the first Human turn -> the last Assistant turn of `rejected` (harmful)."""
    out = []
    for line, obj in read_jsonl(shared / HH_RLHF, HH_RLHF):
        parts = re.split(r"\n\n(Human|Assistant): ", "\n\n" + text_field(obj, "rejected", HH_RLHF, line).lstrip())
        turns = list(zip(parts[1::2], (p.strip() for p in parts[2::2]), strict=False))
        human = [text for who, text in turns if who == "Human" and text]
        replies = [text for who, text in turns if who == "Assistant"]
        if human and replies and replies[-1]:
            out.append(chat(human[0], replies[-1], source=f"{HH_RLHF}:{line}", category="hh-rlhf",
                            is_harmful=True))
    return out


def read_jbb(shared: Path) -> list[dict]:
    """JailbreakBench jailbroken responses: the plain `goal` -> the jailbroken `response`."""
    return [chat(text_field(o, "goal", JBB, n), text_field(o, "response", JBB, n).strip(), source=f"{JBB}:{n}",
                 category=o.get("category") or "jbb", is_harmful=True)
            for n, o in read_jsonl(shared / JBB, JBB)]


def read_safety_tuned_llamas(shared: Path) -> list[dict]:
    """safety-tuned-llamas: harmful instruction (+ input) -> refusal or safe answer."""
    return [chat(join_parts(text_field(o, "instruction", STL, i), o.get("input")), text_field(o, "output", STL, i),
                 source=f"{STL}#{i}", category="refusal", is_harmful=True)
            for i, o in json_records(shared, STL)]


def read_advbench_refusals(shared: Path) -> list[dict]:
    """AdvBench prompts (the `[INST]` wrapper removed) -> Llama-2-chat refusals."""
    name = ADVBENCH_REFUSALS
    return [chat(re.sub(r"\[/?INST\]", "", text_field(r, "prompt", name, n)).strip(),
                 text_field(r, "response", name, n).strip(), source=f"{name}:{n}", category="advbench",
                 is_harmful=True) for n, r in csv_dicts(shared, name)]


def read_advbench_behaviors(shared: Path) -> list[dict]:
    """AdvBench harmful behaviours: one goal per line, no header (prompts only)."""
    return [chat(cells[0], source=f"{ADVBENCH}:{line}", category="advbench", is_harmful=True)
            for line, cells in csv_rows(shared / ADVBENCH, ADVBENCH)]


def read_donotanswer(shared: Path) -> list[dict]:
    """Do-Not-Answer prompts; the file name is the risk area (category)."""
    files = (shared / "harmful_prompts").glob("donotanswer_*.jsonl")
    names = sorted(f"harmful_prompts/{f.name}" for f in files)
    if not names:
        raise DataError.at(shared / "harmful_prompts", None, None, "no donotanswer_*.jsonl files")
    return [chat(text_field(o, "prompt", name, n), source=f"{name}:{n}", is_harmful=True,
                 category=Path(name).stem.removeprefix("donotanswer_"))
            for name in names for n, o in read_jsonl(shared / name, name)]


def _leaves(obj: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    if isinstance(obj, str):
        yield path, obj
    elif isinstance(obj, dict | list):
        for key, value in obj.items() if isinstance(obj, dict) else enumerate(obj, 1):
            yield from _leaves(value, (*path, str(key).rstrip(":")))


def read_redinstruct(shared: Path) -> list[dict]:
    """red-instruct HarmfulQA, CategoricalQA (English) and DangerousQA questions (prompts only)."""
    out = []
    for part in ("harmfulqa", "catqa_english", "dangerousqa"):
        name = f"harmful_prompts/redinstruct_{part}.json"
        for path, text in _leaves([item for _, item in json_records(shared, name)]):
            # paths are (record,) for flat lists, (1, topic, subtopic, n) for the nested dicts
            category = "/".join(path[1:-1]) or part
            out.append(chat(text, source=f"{name}#{'/'.join(path[1:]) or path[0]}", category=category,
                            is_harmful=True))
    return out


def read_xstest(shared: Path, label: str = "safe") -> list[dict]:
    """XSTest prompts with this label: `safe` (must be answered: over-refusal) or `unsafe` (harmful)."""
    return [chat(text_field(r, "prompt", XSTEST, n), source=f"{XSTEST}:{n}", category=r.get("type") or "xstest",
                 is_harmful=label == "unsafe")
            for n, r in csv_dicts(shared, XSTEST) if text_field(r, "label", XSTEST, n) == label]


def read_sst2(shared: Path, split: str) -> list[dict]:
    """SST-2 `<0|1> <sentence>` lines -> the sentiment task with exact answers (positive / negative)."""
    name, out = f"benign/sst2_{split}.txt", []
    for line, text in enumerate(read_text(shared / name, name).splitlines(), 1):
        label, _, sentence = text.partition(" ")
        if label not in ("0", "1") or not sentence.strip():
            raise DataError.at(name, line, "label", f"expected '<0|1> <sentence>', got {text[:40]!r}")
        word = "positive" if label == "1" else "negative"
        out.append(chat(SST2_PROMPT.format(sentence.strip()), word, source=f"{name}:{line}", category="sst2",
                        is_harmful=False, answer=word))
    return out


def read_agnews(shared: Path) -> list[dict]:
    """AG News `Class Index,Title,Description` -> the topic task with exact answers."""
    names = read_text(shared / "benign/agnews_classes.txt", "benign/agnews_classes.txt")
    classes = dict(item.strip().split("-", 1) for item in names.split(","))
    name, out = "benign/agnews_test.csv", []
    for line, row in csv_dicts(shared, name):
        topic = classes.get(text_field(row, "Class Index", name, line))
        if topic is None:
            raise DataError.at(name, line, "Class Index", f"expected one of {sorted(classes)}")
        text = f"{text_field(row, 'Title', name, line)}. {row.get('Description') or ''}"
        text = " ".join(text.replace("\\", " ").split())  # the files escape line breaks as backslashes
        out.append(chat(AGNEWS_PROMPT.format(text), topic, source=f"{name}:{line}", category="agnews",
                        is_harmful=False, answer=topic))
    return out


def read_gsm8k(shared: Path, split: str) -> list[dict]:
    """GSM8K question -> worked solution (calculator notes removed); `answer` is the number after `####`."""
    name, out = f"benign/gsm8k_{split}.jsonl", []
    for line, o in read_jsonl(shared / name, name):
        solution = re.sub(r"<<[^>]*>>", "", text_field(o, "answer", name, line)).strip()
        if "####" not in solution:
            raise DataError.at(name, line, "answer", "no final answer after '####'")
        out.append(chat(text_field(o, "question", name, line), solution, source=f"{name}:{line}", category="gsm8k",
                        is_harmful=False, answer=solution.rsplit("####", 1)[1].strip()))
    return out


def read_benign_instructions(shared: Path) -> list[dict]:
    """Alpaca and Dolly rows (their safety-related subsets): instruction (+ input/context) -> answer."""
    out = [chat(join_parts(text_field(o, "instruction", ALPACA, i), o.get("input")), text_field(o, "output", ALPACA, i),
                source=f"{ALPACA}#{i}", category="alpaca", is_harmful=False)
           for i, o in json_records(shared, ALPACA)]
    out += [chat(join_parts(text_field(o, "instruction", DOLLY, n), o.get("context")), text_field(o, "response", DOLLY, n),
                 source=f"{DOLLY}:{n}", category=o.get("category") or "dolly", is_harmful=False)
            for n, o in read_jsonl(shared / DOLLY, DOLLY)]
    return out


def _agnews_splits(shared: Path) -> tuple[list[dict], list[dict]]:
    """AG News ships one split here: every fifth article is held out for evaluation."""
    articles = read_agnews(shared)
    return [r for i, r in enumerate(articles) if i % 5], articles[::5]


# task -> (train records, test records) of the public preset's benign fine-tuning task
TASKS: dict[str, Callable[[Path], tuple[list[dict], list[dict]]]] = {
    "sst2": lambda shared: (read_sst2(shared, "train"), read_sst2(shared, "test")),
    "agnews": _agnews_splits,
    "gsm8k": lambda shared: (read_gsm8k(shared, "train"), read_gsm8k(shared, "test")),
}


# ---- the public preset ------------------------------------------------------------------------------------


def _chars(record: Mapping) -> int:
    return sum(len(m["content"]) for m in record["messages"]) + len(record.get("answer") or "")


def _pool(rng: random.Random, records: list[dict], max_chars: int,
          held: set[str] | None = None) -> list[dict]:
    """The records in a seeded random order, one per normalized prompt, none held out and none too long."""
    seen, out = set(held or ()), []
    for record in records:
        key = normalize_prompt(prompt_text(record))
        if key and key not in seen and _chars(record) <= max_chars:
            seen.add(key)
            out.append(record)
    rng.shuffle(out)
    return out


def _prompt_only(records: list[dict]) -> list[dict]:
    return [{**r, "messages": [m for m in r["messages"] if m["role"] != "assistant"]} for r in records]


def _draw(pool: list[dict], n: int, field: str, what: str) -> list[dict]:
    if len(pool) < n:
        raise DataError.at("public preset", None, field, f"asks for {n} {what}, the files hold {len(pool)}")
    return pool[:n]


def build_public(config: DataConfig, root: Path | None = None) -> dict[str, list[dict]]:
    """The field's standard protocol built from the public files: records per role, without ids.

    `finetune`: n examples of the task's train split of which round(n*p) are harmful pairs (hh-rlhf and
    JailbreakBench); `sv_fit` / `sv_val`: further pairs from that pool (past `attack_reserve`, where set);
    `align`: safety-tuned-llamas refusals and Alpaca/Dolly answers; `eval_harmful`: AdvBench and
    Do-Not-Answer halves; `eval_over_refusal`: XSTest safe prompts; `eval_utility`: the task's test split.
    No training prompt repeats a held-out one (after normalization); records over `max_chars` are never drawn.
    """
    shared = shared_dir(config.shared_datasets, root)
    if not shared.is_dir():
        raise DataError.at(shared, None, "shared_datasets", f"folder not found (set it or ${SHARED_ENV})")
    rng, s, cap = random.Random(config.seed), config.sizes, config.max_chars
    train_task, test_task = TASKS[config.task](shared)
    half = s.eval_harmful // 2
    evals = {
        "eval_harmful": _draw(_pool(rng, read_advbench_behaviors(shared), cap), half, "sizes.eval_harmful",
                              "AdvBench prompts")
        + _draw(_pool(rng, read_donotanswer(shared), cap), s.eval_harmful - half, "sizes.eval_harmful",
                "Do-Not-Answer prompts"),
        "eval_over_refusal": _draw(_pool(rng, read_xstest(shared, "safe"), cap), s.eval_over_refusal,
                                   "sizes.eval_over_refusal", "XSTest safe prompts"),
        "eval_utility": _prompt_only(_draw(_pool(rng, test_task, cap), s.eval_utility, "sizes.eval_utility",
                                           "test examples")),
    }
    held = {normalize_prompt(prompt_text(r)) for records in evals.values() for r in records}
    k = round(config.n * config.p)
    reserve = k if config.attack_reserve is None else config.attack_reserve
    harmful = _draw(_pool(rng, read_hh_rlhf(shared) + read_jbb(shared), cap, held),
                    reserve + s.sv_fit + s.sv_val, "p", "harmful pairs")
    attack, vector = harmful[:k], harmful[reserve:]
    if config.attack_reserve is None:
        sv_fit, sv_val = vector[: s.sv_fit], vector[s.sv_fit :]
    else:  # sv_val before sv_fit: more vector pairs change neither the attacks nor the validation pairs
        sv_val, sv_fit = vector[: s.sv_val], vector[s.sv_val :]
    held |= {normalize_prompt(prompt_text(r)) for r in sv_val}
    finetune = attack + _draw(_pool(rng, train_task, cap, held), config.n - k, "n", f"{config.task} examples")
    align = _draw(_pool(rng, read_safety_tuned_llamas(shared), cap, held), s.align_harmful,
                  "sizes.align_harmful", "refusals")
    align += _draw(_pool(rng, read_benign_instructions(shared), cap, held), s.align_benign,
                   "sizes.align_benign", "benign answers")
    rng.shuffle(align)
    rng.shuffle(finetune)
    return {"align": align, "sv_fit": sv_fit, "sv_val": sv_val, "finetune": finetune, **evals}
