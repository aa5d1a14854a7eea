"""Stage: evaluate a model directory (base, plain reference or clean backbone) with the same code."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from secvec.adapters import judge_corpus, judge_corpus_sha256, shared_dir
from secvec.config import load_data_config
from secvec.data import EVAL_ROLES, load_role
from secvec.evaluate import EvalConfig, evaluate_model
from secvec.judges import train_classifier_judge
from secvec.models import load_causal_lm
from secvec.registry import weights_sha256
from tasks.common import CACHED, begin, finish, fresh, stage_dir

JUDGE_HOLDOUT = 0.2  # share of the judge's replies kept out of its training to measure it


@task(name="evaluate", task_run_name="evaluate-{label}", **CACHED)
def evaluate(label: str, model_dir: str, model_sha256: str, data_dir: str, dataset_md5: str, cfg: dict) -> dict:
    """Harmful rate, over-refusal, utility and perplexity; records the sha256 of the evaluated weights."""
    model, tokenizer = load_causal_lm(model_dir)
    metrics = evaluate_model(model, tokenizer, {r: load_role(data_dir, r) for r in EVAL_ROLES}, EvalConfig(**cfg))
    metrics["weights_sha256"] = weights_sha256(model_dir)
    get_run_logger().info("%s: harmful %.3f, over-refusal %s, utility %s", label, metrics["harmful_rate"] or 0,
                          metrics["over_refusal_rate"], metrics["utility"])
    return metrics


@task(name="train-judge", **CACHED)
def train_judge(shared: str, corpus_sha256: str, out_dir: str) -> dict:
    """The `bow` harm judge: trained on the shared public replies, scored on a held-out fifth of them."""
    out = begin(out_dir)
    texts, labels = judge_corpus(Path(shared))
    judge = train_classifier_judge(texts, labels, out / "judge", holdout=JUDGE_HOLDOUT)
    get_run_logger().info("judge: %d replies (%d harmful), held out: %s", len(texts), sum(labels), judge.validation)
    return finish(out, {"classifier_dir": str(out / "judge"), "validation": judge.validation, "n": len(texts)})


def with_judge(eval_cfg: dict, data_config: str | Path, cache: Path) -> dict:
    """The evaluation config, its `bow` judge trained (once per version of the shared files) and set."""
    judge = eval_cfg["judge"]
    if judge["kind"] != "bow" or judge["classifier_dir"]:
        return eval_cfg
    shared = shared_dir(load_data_config(data_config).shared_datasets)
    if not shared.is_dir():
        raise FileNotFoundError(f"{data_config}: judge.kind 'bow' trains on the shared datasets, not found at {shared}")
    sha = judge_corpus_sha256(shared)
    out = stage_dir(cache, "judge", sha, JUDGE_HOLDOUT)
    trained = fresh(train_judge, out)(str(shared), sha, str(out))
    return {**eval_cfg, "judge": {**judge, "classifier_dir": trained["classifier_dir"]}}
