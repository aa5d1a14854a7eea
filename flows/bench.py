"""The effectiveness benchmark: every arm on every protocol cell, through the pipeline's own stages.

Arms: base (no fine-tuning), plain (no defense), secvec (guarded full fine-tuning, vector stripped),
secvec_screen (vector screening drops what the vector explains, then secvec), secvec_lora (guarded task-LoRA),
forgetfilter (Zhao et al. 2023). Every stage is a cached task keyed on its
own inputs, so the bench reuses what the pipeline computed (its vector, its plain reference), an
interrupted bench resumes where it stopped and a re-run only recomputes what changed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ProcessPoolTaskRunner

from flows.environment import one_prefect_server
from flows.pipeline import resolve_base
from secvec.bench.cells import Job, base_pipeline, finetune_configs, plan_jobs, pool_sizes, vector_config
from secvec.bench.immunization import arm_record, unseen_rate, with_immunization
from secvec.bench.tables import (
    headline_rows,
    mlflow_metrics,
    screen_stats,
    summarize,
    target_tags,
    write_tables,
)
from secvec.config import (
    BenchConfig,
    EvalConfig,
    PipelineConfig,
    RuntimeConfig,
    load_bench_config,
    load_data_config,
    load_pipeline_config,
    with_runtime,
)
from secvec.data import load_role
from secvec.device import start
from secvec.evaluate import spread
from secvec.paths import PROJECT_ROOT
from secvec.refs import DataRef, ModelRef
from tasks import tracking
from tasks.bench import attack_pool, cell_data, forgetfilter, score_base_tasks
from tasks.data import prepare_data
from tasks.evaluate import evaluate, with_judge
from tasks.finetune import finetune_backbone, guarded_data, unguarded
from tasks.screen import screen
from tasks.strip import strip
from tasks.vector import fit_security_vector


@dataclass(frozen=True)
class Bench:
    """What every cell shares: configs, the data, the base and its scores."""

    cfg: BenchConfig
    pipe: PipelineConfig
    data: DataRef
    base_seed: int  # which of the bench's bootstrapped bases
    base: ModelRef
    runtime: RuntimeConfig  # pinned: device and precision resolved
    eval_cfg: EvalConfig
    base_metrics: dict
    base_tasks: dict
    eval_harmful: list[dict]  # the evaluation's harmful prompts, and the categories the vector saw
    seen: set[str]

    def unseen(self, metrics: dict) -> float | None:
        return unseen_rate(metrics, self.eval_harmful, self.seen)

    def score(self, arm: str, label: str, model: ModelRef, cell: DataRef, **extra) -> dict:
        metrics = evaluate(label, model, cell, self.eval_cfg, self.runtime)
        tasks = score_base_tasks(label, model, self.data, self.cfg.base_task_examples, self.runtime)
        return arm_record(arm, metrics, tasks, self.unseen(metrics), **extra)

    def vector(self, seed: int):
        """The security vector fitted with this seed (seed 0 is the pipeline's own: the same stage, inputs)."""
        return fit_security_vector(self.base, self.data, vector_config(self.pipe.vector, seed), self.runtime).vector

    def screen_threshold(self, vector) -> float:
        """The vector's label-free cut, calibrated on `sv_val` vs its KL's benign chats: the pipeline's own
        screen stage on the main data (a cell's data holds neither)."""
        cfg = self.pipe.screen.model_copy(update={"mode": "report"})
        return screen(self.base, vector, self.data, cfg, self.runtime).report["threshold"]

    def finetune(self, vector, data: DataRef, cfg):
        return finetune_backbone(self.base, vector, data, cfg, self.runtime)


def run_job(bench: Bench, job: Job, pool: DataRef) -> list[dict]:
    """Every arm of one job: one record per arm with its metrics and immunization conditions."""
    cell, seed = job.cell, job.seed
    data = cell_data(bench.data, pool, cell.harmful, cell.benign, seed)
    cfgs = finetune_configs(bench.pipe.finetune, cell, seed, bench.cfg.epochs, bench.cfg.lora_learning_rate)
    plain_cfg = unguarded(cfgs["full"])  # plain and forgetfilter: the cell's training, without the replay
    runs: dict[str, dict] = {}
    for arm in cell.arms:
        label = f"{arm}-{cell.name}-b{bench.base_seed}-s{seed}"
        if arm == "base":
            runs[arm] = arm_record(arm, bench.base_metrics, bench.base_tasks, bench.unseen(bench.base_metrics))
        elif arm == "plain":
            plain = bench.finetune(None, data, plain_cfg)  # the same stage run as forgetfilter's
            runs[arm] = bench.score(arm, label, plain.model, data, probes=plain.probes)
        elif arm in ("secvec", "secvec_screen", "secvec_lora"):
            vector, train_data, extra = bench.vector(seed), data, {}
            if arm == "secvec_screen":  # the cell's labels are only read to score the screen, never to act
                cut = {"mode": "drop", "threshold": bench.screen_threshold(vector)}
                screened = screen(bench.base, vector, data, bench.pipe.screen.model_copy(update=cut), bench.runtime)
                train_data, extra = screened.data, {"screen": screen_stats(screened.report)}
            ft = cfgs["lora" if arm == "secvec_lora" else "full"]
            guarded = bench.finetune(vector, guarded_data(train_data, bench.data, ft), ft)
            clean = strip(guarded.guarded, data, bench.runtime)
            runs[arm] = bench.score(arm, label, clean.model, data, probes=guarded.probes,
                                    strip_check=clean.strip_check["passed"], **extra)
        else:  # forgetfilter: filter with the noisy (plain) model, re-fine-tune the base on what is left
            noisy = bench.finetune(None, data, plain_cfg)
            kept = forgetfilter(noisy.model, data, bench.data, bench.cfg.forgetfilter, bench.runtime)
            model = bench.finetune(None, kept.data, plain_cfg).model
            runs[arm] = bench.score(arm, label, model, data, filter=kept.stats)
    records = with_immunization(runs, bench.base_metrics, bench.base_tasks, bench.unseen(bench.base_metrics), seed)
    get_run_logger().info("cell %s base %d seed %d: %s", cell.name, bench.base_seed, seed,
                          {r["arm"]: (r["harmful_rate"], r["utility"]) for r in records})
    return [{"base_seed": bench.base_seed, **record} for record in records]


@task(name="bench-cell", task_run_name="cell-{job.cell.name}-base{bench.base_seed}-seed{job.seed}")
def job_task(bench: Bench, job: Job, pool: DataRef) -> list[dict]:
    """`run_job` in a worker process (ProcessPoolTaskRunner) when the bench runs cells in parallel; every
    stage sets the configured threads in the worker."""
    return run_job(bench, job, pool)


@flow(name="secvec-bench", task_runner=ProcessPoolTaskRunner())  # only `job_task.submit` uses it
def secvec_bench(config: str = "default", out_dir: str | None = None, workers: int = 1,
                 protocols: tuple[str, ...] | None = None, runtime: dict | None = None) -> dict:
    """Run a bench preset (configs/bench/) or bench YAML, all its protocols or only `protocols`; returns
    bench.json's content. workers > 1 runs cells in that many processes, each with the runtime's threads."""
    cfg = load_bench_config(config)
    pipe = with_runtime(load_pipeline_config(cfg.pipeline), runtime or {})
    rt, hw = start(pipe.runtime)
    if workers * rt.threads > len(os.sched_getaffinity(0)):
        get_run_logger().warning("%d workers x %d threads exceed the %d cores: every matmul will stall", workers,
                                 rt.threads, len(os.sched_getaffinity(0)))
    cfg = cfg.model_copy(update={"epochs": cfg.epochs or pipe.finetune.train.epochs})  # cells that set none
    jobs = plan_jobs(cfg, pipe.finetune, protocols)  # an unknown protocol fails here, before any work
    out = Path(out_dir) if out_dir else PROJECT_ROOT / "outputs" / "bench" / cfg.name
    started = time.perf_counter()
    with tracking.start_run(cfg.experiment, PROJECT_ROOT, run_name=cfg.name):
        tracking.log_config(cfg.model_dump(mode="json"))
        tracking.log_runtime(hw.describe())
        data = prepare_data(str(pipe.data), str(pipe.data_dir) if pipe.data_dir else None)
        pool = attack_pool(load_data_config(pipe.data), data, *pool_sizes(cfg))
        eval_cfg = with_judge(cfg.eval or pipe.eval, pipe.data, rt)
        eval_harmful = spread(load_role(data.dir, "eval_harmful"), eval_cfg.max_per_role)
        seen = {ex["category"] for ex in load_role(data.dir, "sv_fit")}
        benches = []
        for b in range(cfg.bases):
            base, _ = resolve_base(base_pipeline(pipe, b), data, rt, {})
            benches.append(Bench(cfg, pipe, data, b, base, rt, eval_cfg, evaluate(f"base-b{b}", base, data, eval_cfg, rt),
                                 score_base_tasks(f"base-b{b}", base, data, cfg.base_task_examples, rt),
                                 eval_harmful, seen))
        work = [(bench, job) for bench in benches for job in jobs]
        if workers > 1:
            for bench in benches:
                for seed in sorted({job.seed for job in jobs}):
                    bench.vector(seed)  # shared by many cells: fitted here, so no two processes write it
            futures = [job_task.submit(bench, job, pool) for bench, job in work]
            results = [future.result() for future in futures]
        else:
            results = [run_job(bench, job, pool) for bench, job in work]
        runs = [{**record, "cell": cell.name, "protocol": cell.protocol} for (_, job), records in zip(work, results)
                for cell in job.cells for record in records if record["arm"] in cell.arms]
        result = {**summarize(cfg, runs, protocols), "dataset_md5": data.md5,
                  "base_model_sha256": [bench.base.sha256 for bench in benches],
                  "pool_md5": pool.md5, "wall_s": round(time.perf_counter() - started, 1)}
        table = write_tables(result, runs, out)
        mlflow.log_metrics(mlflow_metrics(result))
        mlflow.set_tags(target_tags(result))
        mlflow.log_artifacts(str(out), artifact_path="bench")
        create_markdown_artifact(table, key="secvec-bench", description="secvec bench tables")
        if rows := headline_rows(result):
            create_table_artifact(rows, key="secvec-bench-headline", description=f"headline cell {result['headline']}")
        get_run_logger().info("bench: %s", out / "bench.json")
    return result


def run_bench(config: str = "default", out_dir: str | None = None, workers: int = 1,
              protocols: tuple[str, ...] | None = None, runtime: dict | None = None) -> dict:
    """The bench flow with exactly `workers` processes for its cells."""
    with one_prefect_server(workers):
        return secvec_bench.with_options(task_runner=ProcessPoolTaskRunner(max_workers=workers))(
            config=config, out_dir=out_dir, workers=workers, protocols=protocols, runtime=runtime)
