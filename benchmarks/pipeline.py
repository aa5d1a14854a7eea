"""Orchestration overhead: Prefect + MLflow + DVC time as a share of a whole `secvec run`'s wall time.

Each run is the real command (`secvec run`) in a child process whose project root (SECVEC_ROOT) is a
scratch folder holding a copy of configs/: its own Prefect home, MLflow store, DVC repo and remote, stage
cache and outputs. The config is the default preset (what `make run` runs) and, for contrast, the micro
preset, both with their data in `data/` under DVC. Overhead = wall time - compute stages (report
`timings_s`) - importing the compute libraries.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import result

ROOT = Path(__file__).resolve().parents[1]
# Stages that are model work; prepare_data (data build + DVC add/push), gate and register are not.
COMPUTE = ("bootstrap", "fit_vector", "vector_coverage", "guarded_finetune", "strip", "evaluate", "plain_reference")
CONFIG = "bench-overhead"


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scratch_project(work: Path, preset: str) -> Path:
    """A project root with configs/ and a pipeline config: the preset, data versioned with DVC."""
    shutil.copytree(ROOT / "configs", work / "configs")
    cfg = yaml.safe_load((ROOT / "configs" / f"{preset}.yaml").read_text())
    cfg.update(name=CONFIG, data_dir="data", registry={"name": CONFIG})
    (work / "configs" / f"{CONFIG}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return work


def _env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "SECVEC_CACHE", "SECVEC_DVC_REMOTE")}
    # Every store under the scratch root; a port nobody listens on, so no running `make ui` server is used.
    return {**env, "SECVEC_ROOT": str(work), "PREFECT_HOME": str(work / ".prefect"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlruns' / 'mlflow.db'}",
            "SECVEC_PREFECT_PORT": str(_unused_port())}


def ml_import_seconds() -> float:
    """Interpreter start plus importing torch, transformers' Llama and Trainer, and peft (best of two)."""
    code = "import torch, peft; from transformers import LlamaForCausalLM, Trainer"
    times = []
    for _ in range(2):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return min(times)


def timed_run(work: Path, import_s: float) -> dict:
    """One `secvec run` in a child process: wall, compute, overhead and its share."""
    secvec = Path(sys.executable).with_name("secvec")
    start = time.perf_counter()
    # Its own session: on a timeout the whole group goes, the temporary Prefect server included.
    # The harness's thread count (OMP_NUM_THREADS, set by run.py): on shared cores a second thread can stall.
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen([str(secvec), "run", "--config", CONFIG, "--threads", threads], cwd=work, env=_env(work), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=3600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"secvec run failed:\n{stderr[-3000:]}")
    timings = json.loads((work / "outputs" / CONFIG / "report.json").read_text())["timings_s"]
    compute = sum(timings.get(stage, 0.0) for stage in COMPUTE)
    overhead = wall - compute - import_s
    return {"wall_s": round(wall, 2), "compute_s": round(compute, 2), "overhead_s": round(overhead, 2),
            "share": round(overhead / wall, 4), "stage_timings_s": timings}


def overhead_runs(preset: str, import_s: float, nightly: bool) -> dict:
    """cold: fresh Prefect home, MLflow store, DVC repo and stage cache. cached: the same command again,
    every stage a cache hit. nightly: stores kept, stage results gone (a run on new data)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = scratch_project(Path(tmp), preset)
        runs = {"cold": timed_run(work, import_s), "cached": timed_run(work, import_s)}
        if nightly:
            for stale in (".cache", ".prefect/storage"):
                shutil.rmtree(work / stale)
            runs["nightly"] = timed_run(work, import_s)
    return runs


def pipeline_overhead(presets: tuple[str, ...] = ("default", "micro")) -> list[dict]:
    """Orchestration share of `secvec run` per preset: cold and cached (and nightly on micro, where a run
    costs seconds); the value is the default's cold share (`make run` on a fresh clone). On micro,
    compute is seconds and the fixed cost dominates."""
    import_s = ml_import_seconds()
    records = []
    for preset in presets:
        runs = overhead_runs(preset, import_s, nightly=preset != "default")  # a default run is ~9 min
        value = runs["cold"]["share"]
        name = "pipeline_overhead" + ("" if preset == "default" else f"_{preset}")
        records.append(result(name, value, "share of wall time (Prefect + MLflow + DVC)", target="<= 0.15",
                              passed=value <= 0.15, config=f"{preset} preset, data under DVC",
                              ml_import_s=round(import_s, 2), **runs,
                              overhead="wall - compute stages - ML library import; stage timers include each "
                                       "task's own Prefect bookkeeping, so this is a lower bound"))
    return records
