"""Stage: evaluate a model directory (base, plain reference or clean backbone) with the same code."""

from __future__ import annotations

from prefect import get_run_logger, task
from secvec.data import EVAL_ROLES, load_role

from secvec.evaluate import EvalConfig, evaluate_model
from secvec.models import load_causal_lm
from secvec.registry import weights_sha256
from tasks.common import CACHED


@task(name="evaluate", task_run_name="evaluate-{label}", **CACHED)
def evaluate(label: str, model_dir: str, model_sha256: str, data_dir: str, dataset_md5: str, cfg: dict) -> dict:
    """Harmful rate, over-refusal, utility and perplexity; records the sha256 of the evaluated weights."""
    model, tokenizer = load_causal_lm(model_dir)
    metrics = evaluate_model(model, tokenizer, {r: load_role(data_dir, r) for r in EVAL_ROLES}, EvalConfig(**cfg))
    metrics["weights_sha256"] = weights_sha256(model_dir)
    get_run_logger().info("%s: harmful %.3f, over-refusal %s, utility %s", label, metrics["harmful_rate"] or 0,
                          metrics["over_refusal_rate"], metrics["utility"])
    return metrics
