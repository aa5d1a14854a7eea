"""Stage: evaluate a model directory (base, plain reference or clean backbone) with the same code; and the
`bow` harm judge that the evaluation may need, trained once per version of the shared files."""

from __future__ import annotations

from pathlib import Path

from secvec.config import EvalConfig, RuntimeConfig, load_data_config
from secvec.data import EVAL_ROLES, load_role
from secvec.data.judge_corpus import judge_corpus_sha256
from secvec.evaluate import evaluate_model
from secvec.judges import JUDGE_HOLDOUT, train_bow_judge
from secvec.models import load_causal_lm
from secvec.paths import shared_dir
from secvec.refs import DataRef, ModelRef
from secvec.registry import weights_sha256
from tasks.common import hardware, log, stage


@stage("evaluate", labels=("label",), task_run_name="evaluate-{label}")
def evaluate(label: str, model: ModelRef, data: DataRef, cfg: EvalConfig, runtime: RuntimeConfig, out: Path) -> dict:
    """Harmful rate, over-refusal, utility and perplexity; records the sha256 of the evaluated weights."""
    hw = hardware(runtime)
    lm, tokenizer = load_causal_lm(model.dir, device=hw.device, dtype=hw.compute_dtype)
    metrics = evaluate_model(lm, tokenizer, {r: load_role(data.dir, r) for r in EVAL_ROLES}, cfg)
    metrics["weights_sha256"] = weights_sha256(model.dir)
    log.info("%s: harmful %.3f, over-refusal %s, utility %s", label, metrics["harmful_rate"] or 0,
             metrics["over_refusal_rate"], metrics["utility"])
    return metrics


@stage("train-judge", labels=("shared",))
def train_judge(shared: str, corpus_sha256: str, holdout: float, runtime: RuntimeConfig, out: Path) -> dict:
    """The `bow` harm judge: trained on the shared public replies, scored on a held-out share of them."""
    hardware(runtime)  # the classifier trains on the CPU; its threads are the run's
    return train_bow_judge(Path(shared), out / "judge", holdout)


def with_judge(cfg: EvalConfig, data_config: str | Path, runtime: RuntimeConfig) -> EvalConfig:
    """The evaluation config with its `bow` judge trained (a cached stage) and set; other judges as given."""
    judge = cfg.judge
    if judge.kind != "bow" or judge.classifier_dir:
        return cfg
    shared = shared_dir(load_data_config(data_config).shared_datasets)
    if not shared.is_dir():
        raise FileNotFoundError(f"{data_config}: judge.kind 'bow' trains on the shared datasets, not found at {shared}")
    trained = train_judge(str(shared), judge_corpus_sha256(shared), JUDGE_HOLDOUT, runtime)
    return cfg.model_copy(update={"judge": judge.model_copy(update={"classifier_dir": trained["classifier_dir"]})})
