"""Stage: build the dataset roles (the md5 is their lineage id), version them with DVC, log them to MLflow."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from prefect import task

from secvec.config import load_data_config
from secvec.data import ROLES, load_role, prompt_text
from secvec.data.build import build_dataset
from secvec.data.versioning import dataset_md5, tracked_md5, version_data
from secvec.paths import PROJECT_ROOT, cache_root, resolve_path
from secvec.refs import DataRef
from tasks.common import RETRIES, content_key

log = logging.getLogger("secvec.tasks.data")  # under "secvec": Prefect shows it; usable from `.fn`


def _retry_on_io(task, task_run, state) -> bool:
    """Retry I/O failures only: bad input (ConfigError, DataError: ValueErrors) fails at once."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, Exception) and not isinstance(error, ValueError)


@task(name="prepare-data", **RETRIES, retry_condition_fn=_retry_on_io)
def prepare_data(config_path: str, out_dir: str | None = None) -> DataRef:
    """Build the roles of a data config into a folder and compare them with the DVC-tracked version.

    The build is deterministic and cheap, so it always runs: its md5 is what every later stage is keyed on.

    Args:
        config_path: the data config (YAML), absolute or relative to the project root.
        out_dir: where to build; default `<cache>/data/<config name>-<config key>`. The project's `data/`
            is also `dvc add`ed and pushed.
    """
    path = resolve_path(config_path)
    config = load_data_config(path)
    out = Path(out_dir) if out_dir else cache_root() / "data" / f"{path.stem}-{content_key(config)[:12]}"
    manifest = build_dataset(config, out)
    md5 = version_data(PROJECT_ROOT, out)
    tracked = md5 == tracked_md5(PROJECT_ROOT / "data.dvc")
    log.info("dataset %s (%s): %s", md5, "the DVC-tracked version in data.dvc" if tracked else
             "not the version in data.dvc; `secvec data prepare --config ...` versions it", manifest.counts)
    return DataRef(dir=str(out), md5=md5, counts=manifest.counts)


def _row(example: dict) -> dict:
    replies = [m["content"] for m in example["messages"] if m["role"] == "assistant"]
    return {"id": example["id"], "category": example["category"], "is_harmful": example["is_harmful"],
            "prompt": prompt_text(example), "response": replies[-1] if replies else None,
            "answer": example["answer"]}


def source_md5(path: Path) -> str:
    """What `dvc add` would record for a user's data: the md5 of a file's bytes, a folder's `<md5>.dir`."""
    if path.is_dir():
        return dataset_md5(path)
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _user_sources(data: DataRef) -> list[dict]:
    """The user files (`sources`) the build read, as its manifest records them (a derived dataset: none)."""
    path = data.path / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return list(manifest.get("config", {}).get("sources", []))


def _log_input(dataset, **kwargs) -> None:
    """`mlflow.log_input`, once more if it failed: MLflow's SQL store looks a dataset up, then inserts it, so
    two runs logging the same dataset at once collide on its key (seen on a shared PostgreSQL store); the
    second try finds the row the other run inserted."""
    import mlflow

    try:
        mlflow.log_input(dataset, **kwargs)
    except mlflow.exceptions.MlflowException:
        mlflow.log_input(dataset, **kwargs)


def log_dataset_to_mlflow(data: DataRef) -> None:
    """Log each non-empty role as a dataset input of the active MLflow run (context = role); tag the md5.

    Each user source file (or Arrow folder) the roles were built from is logged beside its role (same
    context) as a metadata-only dataset: its absolute path and its content digest (`source_md5`), so a
    run names the very bytes it trained on without copying them.
    """
    import mlflow
    import pandas as pd
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    for role in ROLES:
        rows = [_row(example) for example in load_role(data.dir, role)]
        if rows:
            source = LocalArtifactDatasetSource(str(data.path.resolve() / f"{role}.jsonl"))
            dataset = mlflow.data.from_pandas(pd.DataFrame(rows), source=source, name=role)
            _log_input(dataset, context=role, tags={"dataset_md5": data.md5})
    for spec in _user_sources(data):
        path = resolve_path(spec["path"]).resolve()  # relative to the project root, as prepare_data read it
        split = f"[{spec['split']}]" if spec.get("split") else ""
        dataset = MetaDataset(LocalArtifactDatasetSource(str(path)), name=path.name + split, digest=source_md5(path))
        tags = {"dataset_md5": data.md5, "source_format": spec["format"], "source_split": spec.get("split") or ""}
        _log_input(dataset, context=spec["role"], tags={k: v for k, v in tags.items() if v})
    mlflow.set_tag("dataset_md5", data.md5)
