"""What every stage task shares: content-addressed output folders, cache options, progress in the UI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import Task, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE
from transformers import TrainerCallback

import secvec

DONE = "DONE"
# Re-runs with unchanged inputs reuse results; stage inputs are content hashes and configs, never
# bare paths whose contents could change. A new secvec version invalidates everything.
CACHED = {"cache_policy": INPUTS + TASK_SOURCE, "persist_result": True}
RETRIES = {"retries": 2, "retry_delay_seconds": [2, 10]}


def content_key(*parts) -> str:
    """Short sha256 of JSON-serialisable parts (hashes, configs) plus the library version."""
    blob = json.dumps([secvec.__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_dir(cache_root: str | Path, stage: str, *parts) -> Path:
    """Where a stage writes its output for these inputs: `<cache>/<stage>/<key>`."""
    return Path(cache_root) / stage / content_key(stage, *parts)


def is_done(out_dir: str | Path) -> bool:
    return (Path(out_dir) / DONE).is_file()


@task(name="reuse-stage", task_run_name="reuse-{stage}")
def reuse_stage(stage: str, out_dir: str) -> dict:
    """What a finished stage stored in its output folder."""
    return json.loads((Path(out_dir) / "result.json").read_text())


def fresh(stage: Task, out_dir: str | Path):
    """The stage task, or, when its output folder is finished, a `reuse-<stage>` task returning what it stored.

    The folder is keyed on the stage's inputs (as Prefect's cache is), and it outlives Prefect's record of the
    result: a worker process killed before its results were persisted, another PREFECT_HOME. Without a
    finished folder (e.g. the cache was cleaned) the stage runs again, its Prefect cache refreshed.
    """
    if is_done(out_dir):
        return lambda *args, **kwargs: reuse_stage(stage.name, str(out_dir))
    return stage.with_options(refresh_cache=True)


def begin(out_dir: str | Path) -> Path:
    """Start (or restart) a stage's output folder; an interrupted attempt's checkpoints stay to resume from."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def finish(out_dir: str | Path, result: dict) -> dict:
    """Mark a stage's output complete (written last, so a crash leaves no DONE marker)."""
    out = Path(out_dir)
    (out / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    (out / DONE).write_text("")
    return result


class PrefectProgress(TrainerCallback):
    """Shows training progress of a stage as a Prefect progress artifact (visible while it runs)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.artifact_id = None
        self.last = -1.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.artifact_id = create_progress_artifact(0.0, description=f"{self.stage}: training progress")

    def on_step_end(self, args, state, control, **kwargs):
        percent = 100.0 * state.global_step / max(state.max_steps, 1)
        if self.artifact_id and percent - self.last >= 5:
            update_progress_artifact(self.artifact_id, percent)
            self.last = percent

    def on_train_end(self, args, state, control, **kwargs):
        if self.artifact_id:
            update_progress_artifact(self.artifact_id, 100.0)
