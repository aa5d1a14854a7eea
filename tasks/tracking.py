"""MLflow lineage for a pipeline run: params, per-step training metrics, metrics, tags, artifacts.

Called from the flow's own thread, around the stage tasks (MLflow's active run is thread-local).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlflow

HISTORY_KEYS = ("loss", "learning_rate", "grad_norm")


def start_run(experiment: str, project_root: Path, run_name: str) -> mlflow.ActiveRun:
    """Start a run in `experiment`, creating it with artifacts under `mlruns/` for a local store."""
    if mlflow.get_experiment_by_name(experiment) is None:
        local = mlflow.get_tracking_uri().startswith("sqlite")
        location = (project_root / "mlruns" / "artifacts").as_uri() if local else None
        try:
            mlflow.create_experiment(experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException as err:  # another run created it meanwhile (a shared store)
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    mlflow.set_experiment(experiment)
    return mlflow.start_run(run_name=run_name)


def git_sha(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10,
                             check=False)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def flatten(prefix: str, value) -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in flatten(f"{prefix}.{key}" if prefix else key,
                                                                        sub).items()}
    return {prefix: value}


def log_config(config: dict) -> None:
    params = {k: str(v)[:500] for k, v in flatten("", config).items()}
    items = sorted(params.items())
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        mlflow.log_params(dict(items[i : i + 100]))


def log_runtime(runtime: dict) -> None:
    """Where the run computed (device, precision, threads, versions): a tag each, `runtime.<field>`."""
    mlflow.set_tags({f"runtime.{k}": str(v) for k, v in runtime.items()})


def log_history(stage: str, records: list[dict]) -> None:
    """Per-step training metrics of one stage (`<stage>/loss` at each logged step) and probe losses."""
    for record in records:
        step = int(record.get("step", 0))
        values = {f"{stage}/{k}": v for k, v in record.items()
                  if (k in HISTORY_KEYS or k.endswith(("_loss", "_vector_off")))
                  and isinstance(v, (int, float))}
        if values:
            mlflow.log_metrics(values, step=step)


def log_model_metrics(label: str, metrics: dict | None) -> None:
    if metrics:
        mlflow.log_metrics({f"{label}/{k}": float(v) for k, v in metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
