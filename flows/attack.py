"""`secvec attack`: per arm, the worst harmful rate an attacker reaches by searching the attack's
hyperparameters (Optuna, seeded, resumable), among attacks that keep the user's task (secvec.attack)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import mlflow
import optuna
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.pipeline import resolve_base
from secvec.attack import (
    CONSTRAINT,
    attack_finetune,
    completed,
    open_study,
    plot_history,
    reference_params,
    settled,
    stop_when_settled,
    study_name,
    suggest,
    worst_case,
)
from secvec.config import load_attack_config, load_data_config, load_pipeline_config, with_runtime
from secvec.device import start
from secvec.paths import PROJECT_ROOT
from tasks import tracking
from tasks.bench import attack_pool, cell_data
from tasks.data import prepare_data
from tasks.evaluate import evaluate, with_judge
from tasks.finetune import finetune_backbone, guarded_data, plain_reference, unguarded
from tasks.strip import strip
from tasks.vector import fit_security_vector


@flow(name="secvec-attack")
def secvec_attack(config: str = "default", out_dir: str | None = None, runtime: dict | None = None,
                  trials: int | None = None) -> dict:
    """Run an attack preset (configs/attack/) or YAML; returns attack.json's content. The studies live in
    `<out>/study.db`: a re-run adds only the trials still missing (`trials` overrides the config's)."""
    cfg = load_attack_config(config)
    cfg = cfg.model_copy(update={"trials": trials}) if trials else cfg
    pipe = with_runtime(load_pipeline_config(cfg.pipeline), runtime or {})
    rt, hw = start(pipe.runtime)
    out = Path(out_dir) if out_dir else PROJECT_ROOT / "outputs" / "attack" / cfg.name
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the flow logs each trial itself
    log = get_run_logger()
    with tracking.start_run(cfg.experiment, PROJECT_ROOT, run_name=cfg.name):
        tracking.log_config(cfg.model_dump(mode="json"))
        tracking.log_runtime(hw.describe())
        data = prepare_data(str(pipe.data), str(pipe.data_dir) if pipe.data_dir else None)
        base, _ = resolve_base(pipe, data, rt, {})
        vector = fit_security_vector(base, data, pipe.vector, rt).vector
        pool = attack_pool(load_data_config(pipe.data), data, max(cfg.space.harmful), cfg.benign)
        eval_cfg = with_judge(cfg.eval or pipe.eval, pipe.data, rt)
        # The floor: plain fine-tuning at the pipeline's own settings on the attack's largest data.
        ref_data = cell_data(data, pool, max(cfg.space.harmful), cfg.benign, cfg.seed)
        plain = finetune_backbone(base, None, ref_data, plain_reference(pipe.finetune), rt)
        floor = cfg.utility_floor * (evaluate("attack-reference", plain.model, ref_data, eval_cfg, rt)["utility"] or 0)

        def objective(trial: optuna.Trial, arm: str) -> float:
            params = suggest(trial, cfg.space, arm)
            cell = cell_data(data, pool, params.harmful, cfg.benign, cfg.seed)
            ft_cfg = attack_finetune(pipe.finetune, params, cfg.epochs_scale, sgd_lr_factor=cfg.space.sgd_lr_factor)
            if arm == "secvec":  # the defense as the pipeline runs it, alignment replay included
                ft = finetune_backbone(base, vector, guarded_data(cell, data, ft_cfg), ft_cfg, rt)
            else:
                ft = finetune_backbone(base, None, cell, unguarded(ft_cfg), rt)
            model = strip(ft.guarded, cell, rt).model if arm == "secvec" else ft.model
            metrics = evaluate(f"attack-{arm}-t{trial.number}", model, cell, eval_cfg, rt)
            utility = metrics["utility"] or 0.0
            trial.set_user_attr("utility", utility)
            trial.set_user_attr("over_refusal_rate", metrics["over_refusal_rate"])
            trial.set_constraint(CONSTRAINT, floor - utility)
            log.info("attack %s trial %d: harmful %.3f, utility %.3f (floor %.3f), %s", arm, trial.number,
                     metrics["harmful_rate"], utility, floor, params.model_dump())
            return metrics["harmful_rate"]

        results, reference = {}, reference_params(pipe.finetune, cfg.space, cfg.epochs_scale)
        for arm in cfg.arms:
            # `--trials` only extends a search, so the count is no part of what the trials are measured on
            name = study_name(cfg.name, arm, data, base, vector, pipe.finetune, eval_cfg, rt,
                              cfg.model_dump(exclude={"trials"}))
            study = open_study(out / "study.db", name, cfg.seed)
            if reference is not None:  # run next if the study lacks it (a resumed search included)
                study.enqueue_trial(reference.model_dump(), skip_if_exists=True)
            if (missing := cfg.trials - len(completed(study))) > 0 and not settled(study):
                study.optimize(lambda trial, arm=arm: objective(trial, arm), n_trials=missing,
                               callbacks=[stop_when_settled])
            results[arm] = worst_case(study)
        result = {"config": cfg.name, "pipeline": cfg.pipeline, "utility_floor": floor, "arms": results}
        publish(result, out)
    return result


def publish(result: dict, out: Path) -> None:
    """attack.json and the trial-history plot, in MLflow and as Prefect artifacts."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "attack.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    plot_history(result["arms"], out / "attack_history.png")
    rows = [{"arm": arm, "trials": r["trials"], "feasible": r["feasible"],
             "worst_harmful_rate": (r["worst"] or {}).get("harmful_rate"),
             "utility": (r["worst"] or {}).get("utility"), "params": json.dumps((r["worst"] or {}).get("params"))}
            for arm, r in result["arms"].items()]
    mlflow.log_metrics({f"{row['arm']}/worst_harmful_rate": row["worst_harmful_rate"] for row in rows
                        if row["worst_harmful_rate"] is not None})
    mlflow.log_artifacts(str(out), artifact_path="attack")
    create_table_artifact(rows, key="secvec-attack", description=f"worst attack per arm (task accuracy >= "
                          f"{result['utility_floor']:.3f})")
    lines = [f"- **{r['arm']}**: worst harmful rate {r['worst_harmful_rate']} over {r['feasible']} feasible of "
             f"{r['trials']} trials, {r['params']}" for r in rows]
    image = base64.b64encode((out / "attack_history.png").read_bytes()).decode()
    create_markdown_artifact("\n".join([*lines, "", f"![trial history](data:image/png;base64,{image})"]),
                             key="secvec-attack-summary", description="worst case per arm and the trial history")
    get_run_logger().info("attack: %s", out / "attack.json")
