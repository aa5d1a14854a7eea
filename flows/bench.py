"""The effectiveness benchmark: every arm on every protocol cell, reusing the pipeline's stages.

Arms: base (no fine-tuning), plain (no defense), secvec (guarded full fine-tuning, vector stripped),
secvec_lora (guarded task-LoRA), forgetfilter (Zhao et al. 2023). Every stage is a cached task, so an
interrupted bench resumes where it stopped and a re-run only recomputes what changed.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flows.environment import PROJECT_ROOT, configure

configure()

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ProcessPoolTaskRunner

from flows.pipeline import resolve_base
from secvec.bench import aggregate, check_targets, immunization, markdown_tables, plot_sweep, unseen_rate
from secvec.config import ARMS, BenchConfig, Cell, PipelineConfig, load_bench_config, load_pipeline_config
from secvec.data import load_role
from secvec.evaluate import spread
from secvec.report import METRICS as MODEL_METRICS
from secvec.report import plot_probe_losses
from tasks import tracking
from tasks.bench import build_attack_pool, forgetfilter_select, make_cell_data, score_base_tasks
from tasks.common import fresh, stage_dir
from tasks.data import prepare_data
from tasks.evaluate import evaluate, with_judge
from tasks.finetune import finetune_backbone
from tasks.strip import strip
from tasks.vector import fit_security_vector


@dataclass
class Bench:
    """What every cell shares: configs, the base, its scores and where stage outputs go."""

    cfg: BenchConfig
    pipe: PipelineConfig
    cache: Path
    data_dir: str
    md5: str
    base_dir: str
    base_sha: str
    base_metrics: dict
    base_tasks: dict
    seen_categories: set[str]
    eval_harmful: list[dict]
    eval_cfg: dict
    protocols: tuple[str, ...] | None = None  # None: all of the config's

    def score(self, label: str, model_dir: str, sha: str, cell: dict) -> tuple[dict, dict]:
        metrics = evaluate(label, model_dir, sha, cell["data_dir"], cell["md5"], self.eval_cfg)
        tasks = score_base_tasks(label, model_dir, sha, self.data_dir, self.md5, self.cfg.base_task_examples)
        return metrics, tasks

    def vector(self, seed: int) -> dict:
        """The security vector fitted with this seed (seed 0 is the pipeline's own, shared via the cache)."""
        vec = self.pipe.vector
        vec_cfg = vec.model_copy(update={"train": vec.train.model_copy(update={"seed": seed})}).model_dump()
        out = stage_dir(self.cache, "vector", self.base_sha, self.md5, vec_cfg)
        return fresh(fit_security_vector, out)(self.base_dir, self.base_sha, self.data_dir, self.md5, vec_cfg, str(out))

    def finetune(self, cell: dict, cfg: dict, vector: dict | None) -> dict:
        vec_sha = vector["vector_sha256"] if vector else None
        out = stage_dir(self.cache, "guarded" if vector else "plain", self.base_sha, vec_sha, cell["md5"], cfg)
        return fresh(finetune_backbone, out)(self.base_dir, self.base_sha, vector and vector["vector_dir"], vec_sha,
                                             cell["data_dir"], cell["md5"], cfg, str(out))

    def clean(self, guarded: dict, cell: dict) -> dict:
        key = Path(guarded["guarded_dir"]).parent.name
        out = stage_dir(self.cache, "clean", key)
        return fresh(strip, out)(guarded["guarded_dir"], key, cell["data_dir"], cell["md5"], str(out))


def finetune_configs(bench: Bench, cell: Cell, seed: int) -> dict[str, dict]:
    """Full and task-LoRA fine-tuning settings of a cell: the pipeline's, with the cell's attack strength."""
    base = bench.pipe.finetune
    epochs = cell.epochs or bench.cfg.epochs
    full = base.train.model_copy(update={"seed": seed, "epochs": epochs,
                                         "learning_rate": base.train.learning_rate * cell.lr_scale})
    lora = full.model_copy(update={"learning_rate": bench.cfg.lora_learning_rate * cell.lr_scale})
    return {"full": base.model_copy(update={"mode": "full", "train": full}).model_dump(),
            "lora": base.model_copy(update={"mode": "lora", "train": lora}).model_dump()}


def run_cell(bench: Bench, cell: Cell, seed: int, pool: dict) -> list[dict]:
    """Every arm of one cell and seed: one record per arm with its metrics and immunization conditions."""
    out = stage_dir(bench.cache, "bench-cell", bench.md5, pool["md5"], cell.harmful, cell.benign, seed)
    data = fresh(make_cell_data, out)(bench.data_dir, bench.md5, pool["pool_dir"], pool["md5"], cell.harmful,
                                      cell.benign, seed, str(out))
    cfgs = finetune_configs(bench, cell, seed)
    runs: dict[str, dict] = {}
    plain: dict | None = None

    def plain_run() -> dict:
        nonlocal plain
        plain = plain or bench.finetune(data, cfgs["full"], None)
        return plain

    for arm in cell.arms:
        label = f"{arm}-{cell.name}-s{seed}"
        extra: dict = {}
        if arm == "base":
            metrics, tasks = bench.base_metrics, bench.base_tasks
        elif arm == "plain":
            ft = plain_run()
            metrics, tasks = bench.score(label, ft["model_dir"], ft["model_sha256"], data)
            extra["probes"] = ft["probes"]
        elif arm in ("secvec", "secvec_lora"):
            ft = bench.finetune(data, cfgs["full" if arm == "secvec" else "lora"], bench.vector(seed))
            clean = bench.clean(ft, data)
            metrics, tasks = bench.score(label, clean["model_dir"], clean["model_sha256"], data)
            extra.update(probes=ft["probes"], strip_check=clean["strip_check"]["passed"])
        else:  # forgetfilter: filter with the noisy (plain) model, re-fine-tune the base on what is left
            noisy = plain_run()
            ff_cfg = bench.cfg.forgetfilter.model_dump()
            out = stage_dir(bench.cache, "forgetfilter", noisy["model_sha256"], data["md5"], ff_cfg)
            kept = fresh(forgetfilter_select, out)(noisy["model_dir"], noisy["model_sha256"], data["data_dir"],
                                                   data["md5"], bench.data_dir, bench.md5, ff_cfg, str(out))
            ft = bench.finetune(kept, cfgs["full"], None)
            metrics, tasks = bench.score(label, ft["model_dir"], ft["model_sha256"], data)
            extra["filter"] = kept["stats"]
        runs[arm] = {"seed": seed, "arm": arm,
                     **{k: metrics.get(k) for k in MODEL_METRICS}, "base_tasks": tasks,
                     "unseen_harmful_rate": unseen_rate(metrics, bench.eval_harmful, bench.seen_categories),
                     **extra}
    plain_metrics = runs.get("plain")
    unseen_base = unseen_rate(bench.base_metrics, bench.eval_harmful, bench.seen_categories)
    for record in runs.values():
        record.update(immunization(record, bench.base_metrics, plain_metrics, bench.base_tasks, record["base_tasks"],
                                   {"arm": record["unseen_harmful_rate"], "base": unseen_base}))
    get_run_logger().info("cell %s seed %d: %s", cell.name, seed,
                          {a: (r["harmful_rate"], r["utility"]) for a, r in runs.items()})
    return list(runs.values())


@task(name="bench-cell", task_run_name="cell-{cell.name}-seed{seed}")
def cell_task(bench: Bench, cell: Cell, seed: int, pool: dict, threads: int) -> list[dict]:
    """`run_cell` in a worker process (ProcessPoolTaskRunner) when the bench runs cells in parallel."""
    import torch

    torch.set_num_threads(threads)  # workers x threads <= cores: oversubscribed cores stall every matmul
    return run_cell(bench, cell, seed, pool)


def run_cells(bench: Bench, pool: dict, workers: int) -> list[dict]:
    """Every cell and seed; cells equal in data and training run once, with the union of their arms.
    With workers > 1, in processes.

    Stages that cells share (the vector of each seed) are computed first, so no two processes write one.
    """
    jobs: dict[tuple, list[Cell]] = {}
    for cell in bench.cfg.cells(bench.protocols):
        for seed in range(cell.seeds):
            epochs = finetune_configs(bench, cell, seed)["full"]["train"]["epochs"]  # None and 1.0 may be equal
            jobs.setdefault((cell.harmful, cell.benign, cell.lr_scale, epochs, seed), []).append(cell)
    todo = {key: cells[0].model_copy(update={"arms": tuple(a for a in ARMS if any(a in c.arms for c in cells))})
            for key, cells in jobs.items()}
    if workers > 1:
        for seed in sorted({key[-1] for key in jobs}):
            bench.vector(seed)
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        futures = {key: cell_task.submit(bench, cell, key[-1], pool, threads) for key, cell in todo.items()}
        results = {key: future.result() for key, future in futures.items()}
    else:
        results = {key: run_cell(bench, cell, key[-1], pool) for key, cell in todo.items()}
    return [{**record, "cell": cell.name, "protocol": cell.protocol}
            for key, cells in jobs.items() for cell in cells for record in results[key] if record["arm"] in cell.arms]


def summarize(cfg: BenchConfig, runs: list[dict], protocols: tuple[str, ...] | None = None) -> dict:
    """bench.json: arms -> cell -> metric -> {mean, std, n}, plus cells, targets and the raw runs."""
    cells = {c.name: {**c.model_dump(exclude={"name"}), "epochs": c.epochs or cfg.epochs}
             for c in cfg.cells(protocols)}
    arms: dict[str, dict] = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        arms[arm] = {name: aggregate([r for r in runs if r["arm"] == arm and r["cell"] == name])
                     for name in cells if any(r["arm"] == arm and r["cell"] == name for r in runs)}
    headline = next((n for n, c in cells.items() if c["protocol"] == "paper"), None)
    durability = [n for n, c in cells.items() if c["protocol"] == "durability"]
    filters = {f"{r['cell']}-s{r['seed']}": r["filter"] for r in runs if "filter" in r}
    return {"config": cfg.name, "pipeline": cfg.pipeline, "headline": headline, "cells": cells, "arms": arms,
            "targets": check_targets(arms, headline, durability), "forgetfilter": filters,
            "runs": [{k: v for k, v in r.items() if k != "probes"} for r in runs]}


def publish(bench: dict, runs: list[dict], out: Path) -> None:
    """bench.json, bench.md and plots into `out`, logged to MLflow and shown as Prefect artifacts."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(bench, indent=2, sort_keys=True, default=str))
    table = markdown_tables(bench)
    (out / "bench.md").write_text(table)
    plot_sweep(bench, out / "harmful_rate_vs_p.png")
    first = {r["arm"]: r.get("probes") for r in runs if r["cell"] == bench["headline"] and r["seed"] == 0}
    curves = {"plain (no vector)": first.get("plain"), "secvec (vector on during training)": first.get("secvec")}
    if any(curves.values()):
        plot_probe_losses(curves, out / "finetune_losses.png")
    for arm, per_cell in bench["arms"].items():
        for cell, stats in per_cell.items():
            mlflow.log_metrics({f"{cell}/{arm}/{m}": s["mean"] for m, s in stats.items() if s})
    mlflow.set_tags({"target/" + re.sub(r"[^\w\-. :/]", "", t["target"])[:200]: "passed" if t["passed"] else "missed"
                     for t in bench["targets"]})
    mlflow.log_artifacts(str(out), artifact_path="bench")
    create_markdown_artifact(table, key="secvec-bench", description="secvec bench tables")
    if bench["headline"]:
        rows = [{"arm": arm, **{m: (s or {}).get("mean") for m, s in cells[bench["headline"]].items()}}
                for arm, cells in bench["arms"].items() if bench["headline"] in cells]
        create_table_artifact(rows, key="secvec-bench-headline", description=f"headline cell {bench['headline']}")
    get_run_logger().info("bench: %s", out / "bench.json")


@flow(name="secvec-bench", task_runner=ProcessPoolTaskRunner())  # only `cell_task.submit` uses it
def secvec_bench(config: str = "default", out_dir: str | None = None, workers: int = 1,
                 protocols: tuple[str, ...] | None = None) -> dict:
    """Run a bench preset (configs/bench/) or bench YAML, all its protocols or only `protocols`; returns
    bench.json's content.

    workers > 1 runs cells in that many processes: give each a core (torch threads = cores / workers).
    """
    cfg = load_bench_config(config)
    cfg.cells(protocols)  # an unknown protocol fails here, before any work
    pipe = load_pipeline_config(cfg.pipeline)
    cfg = cfg.model_copy(update={"epochs": cfg.epochs or pipe.finetune.train.epochs})  # cells that set none
    out = Path(out_dir) if out_dir else PROJECT_ROOT / "outputs" / "bench" / cfg.name
    cache = Path(os.environ.get("SECVEC_CACHE", PROJECT_ROOT / ".cache"))
    start, timings = time.perf_counter(), {}
    with tracking.start_run(cfg.experiment, PROJECT_ROOT, run_name=cfg.name):
        tracking.log_config(cfg.model_dump(mode="json"))
        data = prepare_data(str(pipe.data), str(pipe.data_dir) if pipe.data_dir else None)
        base = resolve_base(pipe, data, cache, timings)
        harmful, benign = cfg.pool_sizes()
        pool_out = stage_dir(cache, "attack-pool", str(pipe.data), data["md5"], harmful, benign)
        pool = fresh(build_attack_pool, pool_out)(str(pipe.data), data["data_dir"], data["md5"], harmful, benign,
                                                  str(pool_out))
        eval_cfg = with_judge((cfg.eval or pipe.eval).model_dump(), pipe.data, cache)
        base_metrics = evaluate("base", base["model_dir"], base["model_sha256"], data["data_dir"], data["md5"],
                                eval_cfg)
        base_tasks = score_base_tasks("base", base["model_dir"], base["model_sha256"], data["data_dir"], data["md5"],
                                      cfg.base_task_examples)
        bench = Bench(cfg, pipe, cache, data["data_dir"], data["md5"], base["model_dir"], base["model_sha256"],
                      base_metrics, base_tasks, {ex["category"] for ex in load_role(data["data_dir"], "sv_fit")},
                      spread(load_role(data["data_dir"], "eval_harmful"), eval_cfg["max_per_role"]), eval_cfg,
                      protocols)
        runs = run_cells(bench, pool, workers)
        result = {**summarize(cfg, runs, protocols), "dataset_md5": data["md5"],
                  "base_model_sha256": base["model_sha256"], "pool_md5": pool["md5"],
                  "wall_s": round(time.perf_counter() - start, 1)}
        publish(result, runs, out)
    return result


@contextmanager
def one_prefect_server(workers: int) -> Iterator[None]:
    """With worker processes and no configured server, start one for the run: each worker would otherwise
    start its own temporary server (one API per process, all writing the same database)."""
    if workers == 1 or os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url  # the workers inherit it
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        APILogWorker.drain_all(timeout=5)  # the run's last logs, before their API goes
        del os.environ["PREFECT_API_URL"]
        server.stop()


def run_bench(config: str = "default", out_dir: str | None = None, workers: int = 1,
              protocols: tuple[str, ...] | None = None) -> dict:
    """The bench flow with exactly `workers` processes for its cells."""
    runner = ProcessPoolTaskRunner(max_workers=workers)
    with one_prefect_server(workers):
        return secvec_bench.with_options(task_runner=runner)(config=config, out_dir=out_dir, workers=workers,
                                                             protocols=protocols)
