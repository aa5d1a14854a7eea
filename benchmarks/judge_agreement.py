"""Judge agreement: the refusal judge, the bow judge and the coherence check against hand labels.

    python benchmarks/judge_agreement.py [--limit N] [--judge-steps S] [--out outputs/judge_agreement.md]

Scores the labelled replies of `judge_labels.jsonl` (rules in docs/JUDGES.md; the replies are read from the
shared files and `judge_agreement_smollm2.jsonl`, see benchmarks/judge_sample.py) with the judges exactly
as evaluation builds them: the refusal rules of a default `JudgeConfig`, and the `bow` classifier trained
as the pipeline trains it (same corpus, same held-out share, so no labelled reply was trained on). Prints
one JSON line per figure and writes a markdown table. 1-2.5 minutes on 2 shared CPU cores, no generation.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sklearn.metrics import cohen_kappa_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder of scripts

from benchmarks.common import result, to_line
from benchmarks.judge_sample import generated_replies, hh_chosen, judge_split, reply_sha256, source_of
from secvec.coherence import is_incoherent
from secvec.config import JudgeConfig
from secvec.data.judge_corpus import judge_corpus
from secvec.data.public import XSTEST
from secvec.data.schema import DataError, read_jsonl
from secvec.evaluate import spread
from secvec.judges import JUDGE_HOLDOUT, Judge, make_judge, refusal_judge, train_classifier_judge
from secvec.paths import PROJECT_ROOT, shared_dir
from secvec.text import fold

LABELS = Path(__file__).with_name("judge_labels.jsonl")
FLAGS = ("harmful", "refusal", "incoherent")
# Sources whose replies answer benign prompts: never judged for harm in evaluation (only for refusal).
BENIGN_SOURCES = ("benign",)


@dataclass(frozen=True)
class Item:
    ref: str
    source: str
    harmful_prompt: bool  # the prompt comes from a harmful-prompt source, as `eval_harmful`'s do
    text: str
    labels: dict[str, bool]
    corpus_label: bool | None  # the label the bow judge's corpus gives it (None: not in the corpus)
    note: str


def load_items(labels_path: Path, shared: Path, holdout: float = JUDGE_HOLDOUT) -> list[Item]:
    """The labelled replies, each checked: known ref, unchanged text, not in the bow judge's training set."""
    held, trained = judge_split(shared, holdout)
    texts = {**held, **hh_chosen(shared)}
    generated = generated_replies()
    items = []
    for line, row in read_jsonl(labels_path, labels_path):
        for field, kind in (("ref", str), ("sha256", str), *((f, bool) for f in FLAGS)):
            if not isinstance(row.get(field), kind):
                raise DataError.at(labels_path, line, field, f"expected {kind.__name__}, got {row.get(field)!r}")
        ref = row["ref"]
        text = texts.get(ref, generated.get(ref, {}).get("reply"))
        if text is None:
            raise DataError.at(labels_path, line, "ref", f"{ref!r} is neither a held-out reply of the bow judge, "
                               "an hh-rlhf chosen reply nor a generated reply")
        if reply_sha256(text) != row["sha256"]:
            raise DataError.at(labels_path, line, "sha256", f"the reply of {ref!r} changed since it was labelled")
        if fold(text) in trained:
            raise DataError.at(labels_path, line, "ref", f"{ref!r}: the bow judge trains on this reply")
        source = source_of(ref)
        prompt_ref = generated.get(ref, {}).get("prompt_ref", "")
        items.append(Item(ref, source, source not in BENIGN_SOURCES and not prompt_ref.startswith(XSTEST), text,
                          {f: row[f] for f in FLAGS},
                          source in ("jbb", "hh_rejected") if ref in held else None, row.get("note", "")))
    return items


def train_bow(shared: Path, out: Path, steps: int) -> Judge:
    """The pipeline's bow judge (tasks/evaluate.py train-judge), `steps` short of it only in tests."""
    texts, labels = judge_corpus(shared)
    train_classifier_judge(texts, labels, out, holdout=JUDGE_HOLDOUT, steps=steps)
    return make_judge(JudgeConfig(kind="bow", classifier_dir=str(out)))


def agreement(predicted: Sequence[bool], truth: Sequence[bool], seed: int = 0, rounds: int = 1000) -> dict:
    """Cohen's kappa (with a seeded 95% bootstrap interval), precision, recall, accuracy and the counts."""
    pairs = list(zip(predicted, truth, strict=True))
    tp, fp = sum(p and t for p, t in pairs), sum(p and not t for p, t in pairs)
    fn, tn = sum(t and not p for p, t in pairs), sum(not p and not t for p, t in pairs)
    rng, kappas = random.Random(seed), []
    for _ in range(rounds):
        draw = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        if len({p for p, _ in draw} | {t for _, t in draw}) > 1:  # kappa needs two classes somewhere
            kappas.append(_kappa([p for p, _ in draw], [t for _, t in draw]))
    kappas.sort()
    interval = [round(kappas[int(q * (len(kappas) - 1))], 3) for q in (0.025, 0.975)] if kappas else None
    return {"kappa": _kappa(predicted, truth), "kappa_95": interval,
            "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
            "accuracy": (tp + tn) / len(pairs), "n": len(pairs), "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """None when both raters put every item in one and the same class: chance agreement is then 1."""
    return float(cohen_kappa_score(list(a), list(b))) if len(set(a) | set(b)) > 1 else None


# Harm agreement is also measured on these parts of the harmful-prompt replies (slug -> title, which).
HARM_SUBSETS = {
    "smollm2": ("SmolLM2 replies", lambda it: it.source == "smollm2"),
    "coherent": ("coherent replies (labels)", lambda it: not it.labels["incoherent"]),
    "incoherent": ("incoherent replies (labels)", lambda it: it.labels["incoherent"]),
}


def predictions(items: list[Item], judges: dict[str, Judge]) -> dict[str, dict[str, bool]]:
    """rater -> ref -> verdict: each harm judge on the harmful-prompt replies (as evaluation runs it on
    `eval_harmful`), the refusal rules and the coherence check on every reply."""
    harm = [it for it in items if it.harmful_prompt]
    texts = [it.text for it in items]
    out = {f"{name}_judge": dict(zip([it.ref for it in harm], judge.is_harmful([""] * len(harm),
                                                                                [it.text for it in harm]),
                                     strict=True))
           for name, judge in judges.items()}
    out["refusal_rules"] = dict(zip([it.ref for it in items], refusal_judge(JudgeConfig()).is_refusal(texts),
                                    strict=True))
    out["coherence_check"] = dict(zip([it.ref for it in items], is_incoherent(texts), strict=True))
    return out


def measure(items: list[Item], judges: dict[str, Judge]) -> tuple[list[dict], dict[str, list[Item]]]:
    """One record per (rater, label, subset), and the items each rater gets wrong on its main subset."""
    pred = predictions(items, judges)
    harm = [it for it in items if it.harmful_prompt]
    harm_raters = [r for r in pred if r.endswith("_judge")]
    checks = [(r, "harmful", "harmful prompts", "", harm, pred[r]) for r in harm_raters]
    checks += [(r, "harmful", title, slug, [it for it in harm if keep(it)], pred[r])
               for slug, (title, keep) in HARM_SUBSETS.items() for r in harm_raters]
    checks += [("refusal_rules", "refusal", "all", "", items, pred["refusal_rules"]),
               ("coherence_check", "incoherent", "all", "", items, pred["coherence_check"])]
    records, wrong = [], {}
    for rater, label, title, slug, subset, verdict in checks:
        if not subset:
            continue
        truth = [it.labels[label] for it in subset]
        records.append(_record(rater, label, title, slug, [verdict[it.ref] for it in subset], truth))
        if not slug:
            wrong[rater] = [it for it in subset if verdict[it.ref] != it.labels[label]]
    if len(harm_raters) == 2:  # the two harm judges against each other
        a, b = (pred[r] for r in harm_raters)
        records.append(_record(" vs ".join(harm_raters), "harmful", "harmful prompts", "",
                               [a[it.ref] for it in harm], [b[it.ref] for it in harm]))
    corpus = [it for it in harm if it.corpus_label is not None]
    if corpus:  # how far the corpus's own labels (harmful = hh-rlhf rejected, JailbreakBench) are from ours
        records.append(_record("corpus labels", "harmful", "held-out corpus replies", "",
                               [it.corpus_label for it in corpus], [it.labels["harmful"] for it in corpus]))
    records.append(_by_source(harm, {r: pred[r] for r in harm_raters}))
    return records, wrong


def _record(rater: str, label: str, title: str, slug: str, pred: list[bool], truth: list[bool]) -> dict:
    scores = agreement(pred, truth)
    value, unit = ((scores["kappa"], "cohen_kappa") if scores["kappa"] is not None
                   else (scores["accuracy"], "accuracy (kappa undefined: one class only)"))
    name = "/".join(["judge_agreement", rater.replace(" ", "_"), label, *([slug] if slug else [])])
    return result(name, value, unit, rater=rater, label=label, subset=title, **scores)


def _by_source(harm: list[Item], verdicts: dict[str, dict[str, bool]]) -> dict:
    """Harmful share per source group of the harmful-prompt replies: by the hand labels and by each judge."""
    rows = {}
    for source in sorted({it.source for it in harm}):
        group = [it for it in harm if it.source == source]
        rows[source] = {"n": len(group), "labelled": sum(it.labels["harmful"] for it in group) / len(group),
                        **{r: sum(v[it.ref] for it in group) / len(group) for r, v in verdicts.items()}}
    return result("judge_agreement/by_source", len(harm), "replies", sources=rows)


def markdown(records: list[dict], wrong: dict[str, list[Item]]) -> str:
    """The agreement table, harmful shares by source, and every disagreement with the labels (refs only)."""
    head = ["| rater | label | subset | n | kappa (95% CI) | precision | recall | accuracy | tp / fp / fn / tn |",
            "|---|---|---|---|---|---|---|---|---|"]
    rows = [f"| {r['rater']} | {r['label']} | {r['subset']} | {r['n']} | {_f(r['kappa'])} ({_ci(r)}) | "
            f"{_f(r['precision'])} | {_f(r['recall'])} | {_f(r['accuracy'])} | "
            f"{r['tp']} / {r['fp']} / {r['fn']} / {r['tn']} |" for r in records if "kappa" in r]
    by_source = next(r for r in records if r["name"] == "judge_agreement/by_source")["sources"]
    judges = [k for k in next(iter(by_source.values()), {}) if k not in ("n", "labelled")]
    table = ["| source | n | harmful (labels) | " + " | ".join(f"harmful ({j})" for j in judges) + " |",
             "|---|---|---|" + "---|" * len(judges)]
    table += [f"| {s} | {v['n']} | {v['labelled']:.2f} | " + " | ".join(f"{v[j]:.2f}" for j in judges) + " |"
              for s, v in by_source.items()]
    misses = []
    for rater, items in wrong.items():
        misses += ["", f"**{rater}** disagrees with the labels on {len(items)}:", ""]
        misses += [f"- `{it.ref}` ({it.source}): labels {_flags(it)}{': ' + it.note if it.note else ''}"
                   for it in items]
    return "\n".join([*head, *rows, "", *table, *misses, ""])


def _flags(item: Item) -> str:
    return ", ".join(f for f in FLAGS if item.labels[f]) or "none"


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ci(record: dict) -> str:
    return "n/a" if not record["kappa_95"] else f"{record['kappa_95'][0]:.2f} to {record['kappa_95'][1]:.2f}"


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labels", type=Path, default=LABELS)
    parser.add_argument("--limit", type=int, default=None, help="score n labelled replies spread over the file")
    parser.add_argument("--judge-steps", type=int, default=300, help="bow judge training steps (pipeline: 300)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "outputs" / "judge_agreement.md")
    args = parser.parse_args(argv)
    shared = shared_dir()
    items = spread(load_items(args.labels, shared), args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        judges = {"refusal": make_judge(JudgeConfig()), "bow": train_bow(shared, Path(tmp) / "bow", args.judge_steps)}
        records, wrong = measure(items, judges)
    for record in records:
        print(to_line(record), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")  # never a half-written table under the real name
    partial.write_text(markdown(records, wrong), encoding="utf-8")
    partial.replace(args.out)
    return records


if __name__ == "__main__":
    try:
        main()
    except DataError as err:
        sys.exit(f"judge_agreement: {err}")
