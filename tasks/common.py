"""What every stage task shares: one place that turns a stage's inputs into its output folder and cache key.

A stage writes `<cache>/<stage>/<key>/`, where the key hashes the identities of its inputs (content hashes of
models and data, config fields) and the library version. The folder is the stage's result: `result.json`
and a `DONE` marker are written last, so a crash leaves no finished folder and an interrupted training
resumes from its checkpoints inside it. Prefect's cache is keyed on the same key; it is consulted only while
the folder it points at is finished (a cleaned cache reruns the stage), and a finished folder is reused
even where Prefect lost its record (another PREFECT_HOME, a killed worker process).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from pydantic import TypeAdapter
from transformers import TrainerCallback

import secvec
from secvec.config import RuntimeConfig
from secvec.device import Hardware, apply_threads, resolve
from secvec.paths import cache_root
from secvec.refs import digest

DONE = "DONE"
RETRIES = {"retries": 2, "retry_delay_seconds": [2, 10]}
log = logging.getLogger("secvec.tasks")  # under "secvec", so Prefect shows it (PREFECT_LOGGING_EXTRA_LOGGERS)


def content_key(*parts: Any) -> str:
    """Short sha256 of the parts' identities plus the library version."""
    return digest(secvec.__version__, *parts)[:16]


def is_done(out_dir: str | Path) -> bool:
    return (Path(out_dir) / DONE).is_file()


class Stage:
    """A Prefect task for one pipeline stage, called like the task: `stage(inputs...) -> result`.

    `fn(*inputs, out)` does the work into the folder `out`; its return value (a pydantic model or a
    JSON-able dict, as annotated) is stored in `out/result.json`. The folder and the cache key come from
    every input except those named in `labels` (display names that do not change the result).
    """

    def __init__(self, fn: Callable[..., Any], name: str, labels: Sequence[str] = (), **options: Any) -> None:
        self.name, self.labels = name, tuple(labels)
        signature = inspect.signature(fn)
        self.signature = signature.replace(parameters=[p for n, p in signature.parameters.items() if n != "out"])
        self.result_type = TypeAdapter(typing.get_type_hints(fn).get("return", Any))

        def run(*args: Any, **kwargs: Any) -> Any:
            out = self.out_dir(*args, **kwargs)
            if is_done(out):
                log.info("%s: reusing the finished %s", self.name, out)
                return self.stored(out)
            out.mkdir(parents=True, exist_ok=True)
            result = fn(*args, out=out, **kwargs)
            (out / "result.json").write_bytes(self.result_type.dump_json(result, indent=2))
            (out / DONE).write_text("")
            return result

        functools.update_wrapper(run, fn)
        del run.__wrapped__  # Prefect reads the parameters from __signature__, not from `fn`
        run.__signature__ = self.signature
        self.task = task(run, name=name, cache_key_fn=lambda _, params: self.prefect_key(**params),
                         persist_result=True, **options)

    def out_dir(self, *args: Any, **kwargs: Any) -> Path:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        inputs = {k: v for k, v in bound.arguments.items() if k not in self.labels}
        return cache_root() / self.name / content_key(self.name, inputs)

    def prefect_key(self, *args: Any, **kwargs: Any) -> str:
        """Prefect's cache key: the stage's folder, cache root included. Prefect's result store (PREFECT_HOME)
        may serve several cache roots; a record made for another root points at that root's folders (gone
        with a test session's temp folder), so it must not be found from this one."""
        out = self.out_dir(*args, **kwargs)
        return f"{out.name}-{hashlib.sha256(str(out.parent.parent).encode()).hexdigest()[:8]}"

    def stored(self, out: Path) -> Any:
        return self.result_type.validate_json((out / "result.json").read_bytes())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fresh = not is_done(self.out_dir(*args, **kwargs))
        return self.task.with_options(refresh_cache=fresh)(*args, **kwargs)


def stage(name: str, labels: Sequence[str] = (), **options: Any) -> Callable[[Callable[..., Any]], Stage]:
    """Decorator form of `Stage`."""
    return lambda fn: Stage(fn, name, labels, **options)


def hardware(runtime: RuntimeConfig) -> Hardware:
    """The stage's device and precision, with torch's threads set as configured (in this process: a bench
    worker runs its own)."""
    hw = resolve(runtime)
    apply_threads(hw)
    return hw


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
