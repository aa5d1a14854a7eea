"""Benchmark stages: the attack pool, each cell's data, ForgetFilter's selection, base-task scores.

Training, stripping and evaluation reuse the pipeline's own tasks; these add only what the arms need.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import get_run_logger, task

from secvec import versioning
from secvec.bench import base_task_score, compose_cell, forget_filter, forgetting_scores
from secvec.config import FinetuneConfig, ForgetFilterConfig, load_data_config
from secvec.data import (
    HELD_OUT_ROLES,
    build_dataset,
    check_leakage,
    load_role,
    normalize_prompt,
    prompt_text,
    resolve_path,
)
from secvec.guarded import finetune
from secvec.models import load_causal_lm
from tasks.common import CACHED, begin, finish

CELL_ROLES = ("sv_val", "eval_harmful", "eval_over_refusal", "eval_utility")


# Prompts no attack cell may train on: every held-out role, and the vector's own fitting samples.
EXCLUDED_ROLES = (*HELD_OUT_ROLES, "sv_fit")


def excluded_examples(data_dir: str) -> list[dict]:
    return [ex for role in EXCLUDED_ROLES for ex in load_role(data_dir, role)]


@task(name="build-attack-pool", **CACHED)
def build_attack_pool(data_config: str, data_dir: str, dataset_md5: str, harmful: int, benign: int,
                      out_dir: str) -> dict:
    """The pipeline's data config rebuilt with a fine-tuning role large enough that `harmful` + `benign`
    examples remain once the main dataset's excluded prompts are set aside (a public build draws its vector
    and attack samples from one shuffled pool, so a bigger attack overlaps the main `sv_fit`)."""
    config = load_data_config(resolve_path(data_config))
    excluded = {normalize_prompt(prompt_text(ex)) for ex in excluded_examples(data_dir)}
    out = begin(out_dir)
    want = {True: harmful, False: benign}
    for _ in range(4):
        n = want[True] + want[False]
        manifest = build_dataset(config.model_copy(update={"n": n, "p": want[True] / n}), out / "data")
        usable = [ex for ex in load_role(out / "data", "finetune") if normalize_prompt(prompt_text(ex)) not in excluded]
        short = {kind: need - sum(ex["is_harmful"] == kind for ex in usable)
                 for kind, need in ((True, harmful), (False, benign))}
        if max(short.values()) <= 0:
            get_run_logger().info("attack pool: %s", manifest.counts)
            return finish(out, {"pool_dir": str(out / "data"), "md5": versioning.dataset_md5(out / "data")})
        want = {kind: want[kind] + max(gap, 0) for kind, gap in short.items()}
    raise ValueError(f"{data_config}: cannot build an attack pool with {harmful} harmful and {benign} benign "
                     "examples outside the held-out and vector roles")


def _write_jsonl(path: Path, examples: list[dict]) -> None:
    path.write_text("".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples))


def write_cell_dir(data_dir: str, finetune_examples: list[dict], out: Path) -> dict:
    """A dataset folder for one cell: its fine-tuning set plus the main dataset's held-out roles."""
    out.mkdir(parents=True, exist_ok=True)
    for role in CELL_ROLES:
        shutil.copyfile(Path(data_dir) / f"{role}.jsonl", out / f"{role}.jsonl")
    _write_jsonl(out / "finetune.jsonl", finetune_examples)
    check_leakage({role: load_role(out, role) for role in ("finetune", *CELL_ROLES)}, out)
    return {"data_dir": str(out), "md5": versioning.dataset_md5(out), "harmful": sum(ex["is_harmful"] for ex in finetune_examples),
            "benign": sum(not ex["is_harmful"] for ex in finetune_examples)}


@task(name="make-cell-data", task_run_name="cell-data-{harmful}h-{benign}b-seed{seed}", **CACHED)
def make_cell_data(data_dir: str, dataset_md5: str, pool_dir: str, pool_md5: str, harmful: int, benign: int,
                   seed: int, out_dir: str) -> dict:
    """Draw a cell's fine-tuning set from the pool (seeded), never a prompt of the main held-out roles nor
    one the vector was fitted on (the attack must be data the vector has not seen)."""
    out = begin(out_dir)
    examples = compose_cell(load_role(pool_dir, "finetune"), harmful, benign, seed, excluded_examples(data_dir))
    return finish(out, write_cell_dir(data_dir, examples, out / "data"))


@task(name="forgetfilter-select", **CACHED)
def forgetfilter_select(noisy_dir: str, noisy_sha256: str, cell_dir: str, cell_md5: str, data_dir: str,
                        dataset_md5: str, cfg: dict, out_dir: str) -> dict:
    """ForgetFilter: safe fine-tuning of the noisy model, then drop the examples it forgot the most."""
    config = ForgetFilterConfig(**cfg)
    out = begin(out_dir)
    noisy, tokenizer = load_causal_lm(noisy_dir)
    safe_model, _ = load_causal_lm(noisy_dir)
    refusals = [ex for ex in load_role(data_dir, "align") if ex["is_harmful"]][: config.safe_examples]
    finetune(safe_model, tokenizer, refusals, FinetuneConfig(train=config.safe_train), out / "trainer")
    examples = load_role(cell_dir, "finetune")
    scores = forgetting_scores(noisy, safe_model, tokenizer, examples, config.max_new_tokens)
    kept, stats = forget_filter(examples, scores, config.threshold)
    get_run_logger().info("forgetfilter: kept %d of %d, harmful recall %s, precision %s", stats["kept"],
                          stats["examples"], stats["harmful_recall"], stats["precision"])
    return finish(out, {**write_cell_dir(data_dir, kept, out / "data"), "stats": stats})


@task(name="base-task-score", task_run_name="base-tasks-{label}", **CACHED)
def score_base_tasks(label: str, model_dir: str, model_sha256: str, data_dir: str, dataset_md5: str, n: int) -> dict:
    """The model on the base's own benign alignment data (accuracy where answers exist, perplexity)."""
    model, tokenizer = load_causal_lm(model_dir)
    benign = [ex for ex in load_role(data_dir, "align") if not ex["is_harmful"]][:n]
    return base_task_score(model, tokenizer, benign)
