"""What each bench cell trains on and how: the protocols expanded into cells, cells that train alike merged
into one job, each job's fine-tuning settings, the attack pool they draw from and each cell's dataset."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from secvec.config import (
    ARMS,
    PROTOCOLS,
    BenchConfig,
    Cell,
    DataConfig,
    FinetuneConfig,
    PipelineConfig,
    VectorConfig,
)
from secvec.data import HELD_OUT_ROLES, Manifest, check_leakage, load_role, normalize_prompt, prompt_text
from secvec.data.build import build_dataset, write_dataset

CELL_ROLES = ("sv_val", "eval_harmful", "eval_over_refusal", "eval_utility")
# Prompts no attack cell may train on: every held-out role, and the vector's own fitting samples.
EXCLUDED_ROLES = (*HELD_OUT_ROLES, "sv_fit")


def expand_cells(cfg: BenchConfig, protocols: Collection[str] | None = None) -> list[Cell]:
    """Every cell of the protocols (default: all), in run order (headline first)."""
    if unknown := set(protocols or ()) - set(PROTOCOLS):
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}; choose from {list(PROTOCOLS)}")
    cells = []
    if paper := cfg.paper:
        cells.append(Cell(protocol="paper", name=f"h{paper.harmful}-b{paper.benign}", harmful=paper.harmful,
                          benign=paper.benign, seeds=paper.seeds, arms=paper.arms))
    if sweep := cfg.sweep:
        for p in sweep.p:
            harmful = round(sweep.n * p)
            cells.append(Cell(protocol="sweep", name=f"p{p:g}", harmful=harmful, benign=sweep.n - harmful,
                              seeds=sweep.seeds, arms=sweep.arms))
    if d := cfg.durability:
        for scale in d.lr_scale:
            for epochs in d.epochs:
                cells.append(Cell(protocol="durability", name=f"lr{scale:g}x-ep{epochs:g}", harmful=d.harmful,
                                  benign=d.benign, lr_scale=scale, epochs=epochs, arms=d.arms))
        if d.max_harmful:
            cells.append(Cell(protocol="durability", name=f"h{d.max_harmful}-ep{min(d.epochs):g}",
                              harmful=d.max_harmful, benign=d.benign, epochs=min(d.epochs), arms=d.arms))
    return [c for c in cells if not protocols or c.protocol in protocols]


def pool_sizes(cfg: BenchConfig) -> tuple[int, int]:
    """(harmful, benign) the attack pool must hold for every cell (of all protocols, so that running some
    of them draws the same cells as running all)."""
    cells = expand_cells(cfg)
    return max((c.harmful for c in cells), default=0), max((c.benign for c in cells), default=0)


def base_pipeline(pipe: PipelineConfig, base_seed: int) -> PipelineConfig:
    """The pipeline whose base is bootstrapped with this seed (seed 0: the pipeline's own base)."""
    if pipe.base_model or pipe.base_gguf:
        if base_seed:
            raise ValueError("bench.bases > 1 needs a bootstrapped base: a configured model is one base")
        return pipe
    boot = pipe.bootstrap
    return pipe.model_copy(update={"bootstrap": boot.model_copy(
        update={"train": boot.train.model_copy(update={"seed": base_seed})})})


def vector_config(base: VectorConfig, seed: int) -> VectorConfig:
    """The pipeline's vector fitted with this seed (seed 0 is the pipeline's own vector)."""
    return base.model_copy(update={"train": base.train.model_copy(update={"seed": seed})})


def finetune_configs(base: FinetuneConfig, cell: Cell, seed: int, epochs: float,
                     lora_learning_rate: float) -> dict[str, FinetuneConfig]:
    """Full and task-LoRA fine-tuning settings of a cell: the pipeline's, with the cell's attack strength."""
    full = base.train.model_copy(update={"seed": seed, "epochs": cell.epochs or epochs,
                                         "learning_rate": base.train.learning_rate * cell.lr_scale})
    lora = full.model_copy(update={"learning_rate": lora_learning_rate * cell.lr_scale})
    return {"full": base.model_copy(update={"mode": "full", "train": full}),
            "lora": base.model_copy(update={"mode": "lora", "train": lora})}


class Job(BaseModel):
    """One fine-tuning job: a cell and seed, run once for every cell that trains on the same data alike."""

    model_config = ConfigDict(frozen=True)

    cell: Cell  # the first such cell, with the union of their arms
    seed: int
    cells: tuple[Cell, ...]  # every cell it stands for


def plan_jobs(cfg: BenchConfig, base: FinetuneConfig, protocols: Collection[str] | None = None) -> list[Job]:
    """The cells of the protocols as jobs: cells equal in data and training (harmful, benign, lr scale,
    resolved epochs, seed) run once, with the union of their arms."""
    groups: dict[tuple, list[Cell]] = {}
    for cell in expand_cells(cfg, protocols):
        for seed in range(cell.seeds):
            epochs = cell.epochs or cfg.epochs or base.train.epochs  # None and 1.0 may be equal
            groups.setdefault((cell.harmful, cell.benign, cell.lr_scale, epochs, seed), []).append(cell)
    return [Job(cell=cells[0].model_copy(update={"arms": tuple(a for a in ARMS if any(a in c.arms for c in cells))}),
                seed=key[-1], cells=tuple(cells)) for key, cells in groups.items()]


def compose_cell(pool: Sequence[dict], harmful: int, benign: int, seed: int,
                 held_out: Sequence[dict] = ()) -> list[dict]:
    """`harmful` + `benign` examples drawn (seeded) from the attack pool, shuffled.

    Pool examples whose normalised prompt is in `held_out` (evaluation and vector-validation roles) are
    never drawn, so no cell trains on what it is evaluated on.
    """
    banned = {normalize_prompt(prompt_text(ex)) for ex in held_out}
    usable = [ex for ex in pool if normalize_prompt(prompt_text(ex)) not in banned]
    bad = [ex for ex in usable if ex["is_harmful"]]
    good = [ex for ex in usable if not ex["is_harmful"]]
    if harmful > len(bad) or benign > len(good):
        raise ValueError(f"attack pool holds {len(bad)} harmful / {len(good)} benign usable examples; "
                         f"the cell needs {harmful} / {benign}")
    rng = random.Random(seed)
    chosen = rng.sample(bad, harmful) + rng.sample(good, benign)
    rng.shuffle(chosen)
    return chosen


def excluded_examples(data_dir: str | Path) -> list[dict]:
    return [ex for role in EXCLUDED_ROLES for ex in load_role(data_dir, role)]


def build_attack_pool(config: DataConfig, data_dir: str | Path, harmful: int, benign: int, out: Path) -> Path:
    """The pipeline's data config rebuilt into `out` with a fine-tuning role large enough that `harmful` +
    `benign` examples remain once the main dataset's excluded prompts are set aside (a public build draws its
    vector and attack samples from one shuffled pool, so a bigger attack overlaps the main `sv_fit`; with
    `attack_reserve` the pool is the reserve's first pairs, the same whatever `sv_fit` is)."""
    if config.attack_reserve is not None and harmful > config.attack_reserve:
        raise ValueError(f"the bench's cells need {harmful} harmful pairs; the data config sets aside "
                         f"attack_reserve {config.attack_reserve}: raise it to at least {harmful}")
    excluded = {normalize_prompt(prompt_text(ex)) for ex in excluded_examples(data_dir)}
    want = {True: harmful, False: benign}
    for _ in range(4):
        n = want[True] + want[False]
        build_dataset(config.model_copy(update={"n": n, "p": want[True] / n}), out)
        usable = [ex for ex in load_role(out, "finetune") if normalize_prompt(prompt_text(ex)) not in excluded]
        short = {kind: need - sum(ex["is_harmful"] == kind for ex in usable)
                 for kind, need in ((True, harmful), (False, benign))}
        if max(short.values()) <= 0:
            return out
        want = {kind: want[kind] + max(gap, 0) for kind, gap in short.items()}
    raise ValueError(f"cannot build an attack pool with {harmful} harmful and {benign} benign examples outside "
                     "the held-out and vector roles")


def write_cell_dataset(data_dir: str | Path, finetune: Sequence[dict], out: Path, origin: dict) -> Path:
    """A dataset folder for one cell: its fine-tuning set plus the main dataset's held-out roles."""
    roles = {"finetune": list(finetune), **{role: load_role(data_dir, role) for role in CELL_ROLES}}
    check_leakage(roles, out)
    return write_dataset(roles, out, Manifest.of(roles, "bench-cell", origin.get("seed", 0), origin))
