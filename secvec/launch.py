"""Fine-tuning in N processes (torchrun, DDP) with the same code and, within float rounding, the same result
as one process.

`run_finetune(job)` is the fine-tuning stage's whole body (load the base and the vector, `guarded.finetune`,
save); the stage calls it in its own process when `cfg.launcher.nproc` is 1. `launch_finetune(job)` writes the
job as JSON (`<out>/launch/job.json`) and runs

    python -m torch.distributed.run --standalone --nproc_per_node N \
        -m secvec.launch_worker <out>/launch/job.json

where every rank calls the same `run_finetune`. What makes N processes give one process's numbers:

- the global batch: `train.batch_size` is the global batch, each rank takes batch_size / N (`per_process`);
- the data order: Trainer's random sampler becomes accelerate's `SeedableRandomSampler` (seeded with
  `data_seed`) in one process and in N, and with N accelerate hands rank r the micro-batches r, r + N, ... of
  that one permutation, so a global step sees exactly the examples of the one-process step (the weights agree
  to 1e-6 in tests/test_launch.py). Only a ragged last batch differs: accelerate fills it up with examples from the start
  of the epoch (a warning says so when the example count is not a multiple of the batch);
- the loss: each rank's summed token loss is divided by the token count of all ranks' batches
  (`average_tokens_across_devices` with `num_items_in_batch`, transformers' defaults) and DDP averages the
  gradients, which is the one-process token mean; gradient clipping runs after the all-reduce.

Every rank asserts that the vector is frozen and bit-identical (`VectorGuard` inside `finetune`); rank 0 alone
writes checkpoints (Trainer), computes the probes, saves the model and writes the result, so a killed run
resumes from `<out>/trainer/checkpoint-*` like one process. A failing rank makes torchrun stop the others;
`launch_finetune` then raises `LaunchError` with the failing ranks' tracebacks and the tail of the output.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import traceback
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from transformers import TrainerCallback

from secvec.config import FinetuneConfig
from secvec.data import load_role
from secvec.device import Hardware, apply_threads
from secvec.guarded import finetune, guarded_sha256, probe_sets, save_guarded
from secvec.models import load_causal_lm
from secvec.refs import DataRef, FinetuneResult, GuardedRef, ModelRef, VectorRef
from secvec.strip import save_clean
from secvec.vector import load_vector

log = logging.getLogger(__name__)

WORKER = "secvec.launch_worker"
TAIL_LINES = 40  # of torchrun's output, in a LaunchError
RANK_LINES = 25  # of each rank's traceback or stderr


class LaunchError(RuntimeError):
    """A distributed run failed: torchrun exited non-zero, or rank 0 wrote no result."""


class FinetuneJob(BaseModel):
    """What one fine-tuning run needs, as data (it crosses into the torchrun processes as JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: ModelRef
    vector: VectorRef | None = None  # None: the plain reference arm
    data: DataRef  # its `finetune` role is trained on; probe sets come from it too
    cfg: FinetuneConfig
    hardware: Hardware
    out: str  # the stage's folder: trainer/ (checkpoints), guarded/ or model/, launch/
    # "module:attr" of TrainerCallback factories (a class or a function of no arguments) run on every rank:
    # live callbacks cannot cross into other processes.
    callbacks: list[str] = Field(default_factory=list)


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def per_process(cfg: FinetuneConfig, world_size: int) -> FinetuneConfig:
    """`cfg` with each rank's share of the global batch (`train.batch_size` / world size)."""
    if world_size == 1:
        return cfg
    batch = cfg.train.batch_size
    if batch % world_size:
        raise ValueError(f"train.batch_size {batch} (the global batch) is not a multiple of "
                         f"{world_size} processes")
    # model_copy skips validation: the global-batch check belongs to the config, not to its share
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": batch // world_size})})


def run_finetune(job: FinetuneJob, callbacks: Sequence[TrainerCallback] = ()) -> FinetuneResult | None:
    """The fine-tuning stage: load, `guarded.finetune`, save. In one process, or in each torchrun rank.

    Returns the result on rank 0 (the only rank that saves and computes the probes), None on the others.
    """
    rank, world_size = world()
    hw, out = job.hardware, Path(job.out)
    model, tokenizer = load_causal_lm(job.base.dir, device=hw.device)  # float32 master weights
    arm = "guarded" if job.vector else "plain"
    if job.vector:
        model = load_vector(model, job.vector.dir, job.base.sha256)
    examples = load_role(job.data.dir, "finetune")
    if world_size > 1 and len(examples) % job.cfg.train.batch_size and rank == 0:
        log.warning("%d examples are not a multiple of the global batch %d: the last batch of each epoch is "
                    "filled up with examples from the epoch's start (one process trains a smaller last "
                    "batch), so %d processes differ from one there", len(examples), job.cfg.train.batch_size,
                    world_size)
    callbacks = [*callbacks, *(_load_callback(path) for path in job.callbacks)]
    probes = probe_sets(job.data.dir) if rank == 0 else None  # rank 0 alone measures them
    result = finetune(model, tokenizer, examples, per_process(job.cfg, world_size), out / "trainer",
                      probes=probes, callbacks=callbacks, hardware=hw)
    if rank != 0:
        return None
    log.info("%s fine-tuning done: final loss %.3f", arm, result["history"][-1].get("train_loss", -1))
    if job.vector:
        saved = save_guarded(model, tokenizer, out / "guarded")
        guarded = GuardedRef(dir=str(saved), sha256=guarded_sha256(saved))
        return FinetuneResult(arm=arm, guarded=guarded, **result)
    return FinetuneResult(arm=arm, model=ModelRef.of(save_clean(model, tokenizer, out / "model")), **result)


def _load_callback(path: str) -> TrainerCallback:
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"callback {path!r}: expected 'module:attr'")
    return getattr(importlib.import_module(module), attr)()


def backend(job: FinetuneJob) -> str:
    """The process-group backend: the configured one, or nccl on CUDA and gloo elsewhere."""
    chosen = job.cfg.launcher.backend
    if chosen == "auto":
        return "nccl" if job.hardware.device == "cuda" else "gloo"
    if chosen == "nccl" and job.hardware.device != "cuda":
        raise ValueError(f"launcher.backend 'nccl' needs runtime.device cuda, not {job.hardware.device}")
    return chosen


def _check_devices(job: FinetuneJob) -> None:
    nproc, device = job.cfg.launcher.nproc, job.hardware.device
    if device == "mps":
        raise ValueError("launcher.nproc > 1: MPS is one device; train in one process")
    if device == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"launcher.nproc {nproc}: only {torch.cuda.device_count()} CUDA devices are visible")


# ---- the parent: torchrun --------------------------------------------------------------------------------


def launch_finetune(job: FinetuneJob, env: Mapping[str, str] | None = None,
                    timeout: float | None = None) -> FinetuneResult:
    """Run `run_finetune(job)` in `job.cfg.launcher.nproc` torchrun processes; the result rank 0 wrote.

    Args:
        env: extra environment of the processes (e.g. PYTHONPATH for `job.callbacks`).
        timeout: seconds after which the run is stopped (None: never).

    Raises:
        ValueError: a launcher setting this machine cannot run (backend, device count).
        LaunchError: a rank failed (its traceback and the output's tail in the message), or no result came.
    """
    backend(job)
    _check_devices(job)
    work = Path(job.out) / "launch"
    shutil.rmtree(work / "errors", ignore_errors=True)  # a previous attempt's leftovers must not be read back
    (work / "result.json").unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    spec = work / "job.json"
    spec.write_text(job.model_dump_json(indent=2))
    log.info("launching %d processes (%s): %s", job.cfg.launcher.nproc, backend(job), spec)
    # torch's CPU threads per rank as configured (torchrun would otherwise set OMP_NUM_THREADS=1 itself)
    torchrun(WORKER, [str(spec)], job.cfg.launcher.nproc, work,
             env={"OMP_NUM_THREADS": str(job.hardware.threads), **(env or {})}, timeout=timeout)
    result = work / "result.json"
    if not result.is_file():
        raise LaunchError(f"distributed fine-tuning ended without a result from rank 0 ({result} is missing)")
    return FinetuneResult.model_validate_json(result.read_text())


def torchrun(module: str, args: Sequence[str], nproc: int, work: str | Path,
             env: Mapping[str, str] | None = None, timeout: float | None = None) -> None:
    """`python -m torch.distributed.run --standalone --nproc_per_node N -m module args...`, its output
    (every rank's, prefixed `[default<rank>]:`) streamed line by line to this module's log.

    A rank may leave its traceback in `<work>/errors/rank<N>.txt` (the worker does); the logs of every rank
    are kept under `<work>/logs/`.

    Args:
        timeout: seconds after which the run is stopped (None: never; a test's guard against a hung rank).

    Raises:
        LaunchError: torchrun exited non-zero, or ran past `timeout`.
    """
    work = Path(work)
    # --standalone: a local rendezvous on a free port (a fixed --master_port could clash with another run)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--log-dir", str(work / "logs"), "--tee", "3", "-m", module, *args]
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, **(env or {})})
    expired = threading.Event()
    timer = threading.Timer(timeout, lambda: (expired.set(), _stop(proc))) if timeout else None
    try:
        if timer:
            timer.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n").rsplit("\r", 1)[-1]  # a progress bar's lines: its last state
            tail.append(line)
            log.info("%s", line)
        rc = proc.wait()
    finally:
        if timer:
            timer.cancel()
        if proc.poll() is None:  # this process was interrupted: stop the ranks
            _stop(proc)
    if expired.is_set():
        tail.append(f"--- stopped after the timeout of {timeout:g} s")
    if rc != 0:
        raise LaunchError(_failure(rc, nproc, work, tail))


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to torchrun, which forwards it to the ranks; SIGKILL if it is still there 30 s later."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _failure(rc: int, nproc: int, work: Path, tail: Sequence[str]) -> str:
    """The error: each rank's traceback (the worker's `errors/rank<N>.txt`) or else the tail of its stderr
    (torchrun's `logs/<run>/attempt_*/<rank>/stderr.log`), then the tail of torchrun's own output."""
    head = f"distributed run failed: torchrun exited with {rc} ({nproc} processes; logs in {work / 'logs'})"
    lines = [head]
    runs = sorted((p for p in (work / "logs").glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    stderr = {f.parent.name: f for f in sorted(runs[-1].glob("attempt_*/*/stderr.log"))} if runs else {}
    tracebacks = {f.stem.removeprefix("rank"): f for f in (work / "errors").glob("rank*.txt")}
    for rank in sorted(stderr.keys() | tracebacks.keys()):
        source = tracebacks.get(rank) or stderr[rank]
        text = source.read_text(errors="replace").rstrip().splitlines()[-RANK_LINES:]
        if text:
            lines += [f"--- rank {rank} ({source.relative_to(work)}):", *text]
    if len(lines) == 1:
        lines.append("--- no rank left a traceback or any stderr")
    tail = list(tail)
    # torchrun's own traceback says nothing about the ranks: from its failure summary (a line of '=') on
    summary = next((i for i, line in enumerate(tail) if line.startswith("=====")), 0)
    lines += ["--- torchrun's last output:", *tail[summary:]]
    return "\n".join(lines)


# ---- a rank: python -m secvec.launch_worker JOB_JSON -------------------------------------------------------


def worker_main(spec: str | Path) -> None:
    """One torchrun rank: join the process group, `run_finetune`, rank 0 writes `result.json` (atomically)."""
    spec = Path(spec)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
    work = spec.parent
    rank = f"-unknown-{os.getpid()}"  # failed before joining the group
    try:
        job = FinetuneJob.model_validate_json(spec.read_text())
        if job.hardware.device == "cuda":
            torch.cuda.set_device(dist.get_node_local_rank())  # "cuda" is this rank's device from here on
        dist.init_process_group(backend(job))
        rank = str(dist.get_rank())
        apply_threads(job.hardware)
        result = run_finetune(job)
        if result is not None:
            tmp = work / "result.json.tmp"
            tmp.write_text(result.model_dump_json(indent=2))
            tmp.replace(work / "result.json")
    except BaseException:
        (work / "errors").mkdir(parents=True, exist_ok=True)
        (work / "errors" / f"rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
