"""Benchmark stages: the attack pool, each cell's data, ForgetFilter's selection, base-task scores.

Training, stripping and evaluation reuse the pipeline's own stages; these add only what the arms need.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from secvec.bench.cells import build_attack_pool, compose_cell, excluded_examples, write_cell_dataset
from secvec.bench.forgetfilter import forgetfilter_select
from secvec.bench.immunization import base_task_score
from secvec.config import DataConfig, ForgetFilterConfig, RuntimeConfig
from secvec.data import load_role
from secvec.models import load_causal_lm
from secvec.refs import DataRef, ModelRef
from tasks.common import hardware, log, stage


class Filtered(BaseModel):
    """ForgetFilter's output: the cell's dataset with the dropped examples left out, and how well it caught harm."""

    model_config = ConfigDict(frozen=True)

    data: DataRef
    stats: dict


@stage("attack-pool")
def attack_pool(config: DataConfig, data: DataRef, harmful: int, benign: int, out: Path) -> DataRef:
    """The pipeline's data rebuilt with enough fine-tuning examples outside the main held-out and vector
    roles for the largest cell."""
    pool = DataRef.of(build_attack_pool(config, data.dir, harmful, benign, out / "data"))
    log.info("attack pool %s: %d harmful, %d benign wanted", pool.md5, harmful, benign)
    return pool


@stage("make-cell-data", task_run_name="cell-data-{harmful}h-{benign}b-seed{seed}")
def cell_data(data: DataRef, pool: DataRef, harmful: int, benign: int, seed: int, out: Path) -> DataRef:
    """Draw a cell's fine-tuning set from the pool (seeded), never a prompt of the main held-out roles nor
    one the vector was fitted on (the attack must be data the vector has not seen)."""
    examples = compose_cell(load_role(pool.dir, "finetune"), harmful, benign, seed, excluded_examples(data.dir))
    origin = {"pool_md5": pool.md5, "harmful": harmful, "benign": benign, "seed": seed}
    return DataRef.of(write_cell_dataset(data.dir, examples, out / "data", origin))


@stage("forgetfilter-select")
def forgetfilter(noisy: ModelRef, cell: DataRef, data: DataRef, cfg: ForgetFilterConfig, runtime: RuntimeConfig,
                 out: Path) -> Filtered:
    """ForgetFilter: safe fine-tuning of the noisy model, then drop the examples it forgot the most."""
    refusals = [ex for ex in load_role(data.dir, "align") if ex["is_harmful"]]
    kept, stats = forgetfilter_select(noisy.dir, load_role(cell.dir, "finetune"), refusals, cfg, out / "trainer",
                                      hardware(runtime))
    log.info("forgetfilter: kept %d of %d, harmful recall %s, precision %s", stats["kept"], stats["examples"],
             stats["harmful_recall"], stats["precision"])
    kept_dir = write_cell_dataset(data.dir, kept, out / "data", {"filtered_from": cell.md5})
    return Filtered(data=DataRef.of(kept_dir), stats=stats)


@stage("base-task-score", labels=("label",), task_run_name="base-tasks-{label}")
def score_base_tasks(label: str, model: ModelRef, data: DataRef, n: int, runtime: RuntimeConfig, out: Path) -> dict:
    """The model on the base's own benign alignment data (accuracy where answers exist, perplexity)."""
    hw = hardware(runtime)
    lm, tokenizer = load_causal_lm(model.dir, device=hw.device, dtype=hw.compute_dtype)
    return base_task_score(lm, tokenizer, [ex for ex in load_role(data.dir, "align") if not ex["is_harmful"]][:n])
