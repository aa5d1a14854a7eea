"""Stage: build the dataset roles (the md5 is their lineage id) and log them to MLflow."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from prefect import task

from secvec.config import load_data_config
from secvec.data import PROJECT_ROOT, ROLES, build_dataset, load_role, prompt_text, resolve_path
from secvec.versioning import dataset_md5, ensure_dvc_repo, track_and_push, tracked_md5

# Under "secvec" so Prefect shows it (PREFECT_LOGGING_EXTRA_LOGGERS), and usable from `prepare_data.fn`.
log = logging.getLogger("secvec.tasks.data")


def _retry_on_io(task, task_run, state) -> bool:
    """Retry I/O failures only: bad input (ConfigError, DataError: ValueErrors) fails at once."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, Exception) and not isinstance(error, ValueError)


@task(name="prepare-data", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_retry_on_io)
def prepare_data(config_path: str, out_dir: str | None = None) -> dict:
    """Build the roles of a data config into a folder and compare them with the DVC-tracked version.

    Args:
        config_path: the data config (YAML), absolute or relative to the project root.
        out_dir: where to build; default `<cache>/data/<config name>-<config hash>` with the cache at
            `$SECVEC_CACHE` or `.cache/`. The project's `data/` is also `dvc add`ed and pushed.

    Returns:
        `md5` (DVC's folder md5), `counts` per role, `data_dir`, and `dvc_tracked`: whether the data is
        the version recorded in the project's `data.dvc`.
    """
    path = resolve_path(config_path)
    config = load_data_config(path)
    key = hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12]
    cache = Path(os.environ.get("SECVEC_CACHE", PROJECT_ROOT / ".cache"))
    out = Path(out_dir) if out_dir else cache / "data" / f"{path.stem}-{key}"
    manifest = build_dataset(config, out)
    if out.resolve() == (PROJECT_ROOT / "data").resolve():
        ensure_dvc_repo(PROJECT_ROOT)
        md5 = track_and_push(PROJECT_ROOT, out)
    else:
        md5 = dataset_md5(out)
    tracked = md5 == tracked_md5(PROJECT_ROOT / "data.dvc")
    log.info("dataset %s (%s): %s", md5, "the DVC-tracked version in data.dvc" if tracked else
             "not the version in data.dvc; `secvec data prepare --config ...` versions it", manifest.counts)
    return {"md5": md5, "counts": manifest.counts, "data_dir": str(out), "dvc_tracked": tracked}


def _row(example: dict) -> dict:
    replies = [m["content"] for m in example["messages"] if m["role"] == "assistant"]
    return {"id": example["id"], "category": example["category"], "is_harmful": example["is_harmful"],
            "prompt": prompt_text(example), "response": replies[-1] if replies else None,
            "answer": example["answer"]}


def log_dataset_to_mlflow(data_dir: str | Path, md5: str) -> None:
    """Log each non-empty role as a dataset input of the active MLflow run (context = role); tag the md5."""
    import mlflow
    import pandas as pd
    from mlflow.data.sources import LocalArtifactDatasetSource

    for role in ROLES:
        rows = [_row(example) for example in load_role(data_dir, role)]
        if rows:
            source = LocalArtifactDatasetSource(str(Path(data_dir).resolve() / f"{role}.jsonl"))
            dataset = mlflow.data.from_pandas(pd.DataFrame(rows), source=source, name=role)
            mlflow.log_input(dataset, context=role, tags={"dataset_md5": md5})
    mlflow.set_tag("dataset_md5", md5)
