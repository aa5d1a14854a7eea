"""The fine-tuning stage in 2 torchrun processes (DDP, gloo, CPU) gives one process's clean backbone within
float rounding, the security vector bit-identical; a killed 2-process run resumes from its checkpoint when the
stage runs again; a failing rank raises a clear error and leaves no finished stage."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from secvec.config import FinetuneConfig, RuntimeConfig, TrainConfig
from secvec.config.stages import LauncherConfig
from secvec.device import Hardware
from secvec.launch import FinetuneJob, LaunchError, launch_finetune, run_finetune, torchrun
from secvec.models import hash_model_dir
from secvec.refs import DataRef, FinetuneResult, ModelRef, VectorRef
from secvec.vector import VECTOR_NAME
from tasks.common import is_done
from tasks.finetune import finetune_backbone

TESTS = Path(__file__).parent
HW = Hardware("cpu", "fp32", threads=1)
RUNTIME = RuntimeConfig(device="cpu", precision="fp32", threads=1)
# 144 examples, global batch 8: 18 steps an epoch, so no ragged last batch within the 6 steps
TRAIN = TrainConfig(learning_rate=1e-3, max_steps=6, batch_size=8, weight_decay=0.01, seed=7, save_steps=2,
                    logging_steps=1, progress_bar=False)
# Measured here: max |1 process - 2 processes| over the clean backbone 1.2e-7 (float32 reduction order; the
# 6 steps move the weights by up to 3e-3).
TOLERANCE = 1e-6


def _cfg(nproc: int) -> FinetuneConfig:
    return FinetuneConfig(train=TRAIN, probe_steps=3, launcher=LauncherConfig(nproc=nproc, backend="gloo"))


def _record(i: int, ex: dict, harmful: bool) -> dict:
    return {"id": f"ft-{i}", "source": "test", "role": "finetune", "category": "harmful" if harmful else "sort",
            "is_harmful": harmful, "messages": ex["messages"], "answer": None}


@pytest.fixture(scope="module")
def inputs(micro_base, micro_vector, world, tmp_path_factory):
    data = tmp_path_factory.mktemp("launch-data")
    records = [_record(i, ex, True) for i, ex in enumerate(world["harmful_ft"])]
    records += [_record(len(records) + i, ex, False) for i, ex in enumerate(world["benign_ft"])]
    (data / "finetune.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    base = ModelRef(dir=str(micro_base), sha256=hash_model_dir(micro_base))
    vector = VectorRef(dir=str(micro_vector), sha256="micro-vector")
    return base, vector, DataRef(dir=str(data), md5=f"launch-test-{len(records)}")


def _job(inputs, nproc: int, out: Path, **kw) -> FinetuneJob:
    base, vector, data = inputs
    return FinetuneJob(base=base, vector=vector, data=data, cfg=_cfg(nproc), hardware=HW, out=str(out), **kw)


def _backbone(result: FinetuneResult) -> dict[str, torch.Tensor]:
    return load_file(Path(result.guarded.dir) / "backbone" / "model.safetensors")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _one_process(job: FinetuneJob) -> FinetuneResult:
    threads = torch.get_num_threads()
    torch.set_num_threads(HW.threads)  # as each torchrun rank does (apply_threads)
    try:
        return run_finetune(job)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_processes_match_one_and_a_killed_run_resumes(inputs, micro_vector, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="secvec.launch")
    one = _one_process(_job(inputs, 1, tmp_path / "one"))
    two = launch_finetune(_job(inputs, 2, tmp_path / "two"), timeout=300)

    diff = _max_diff(_backbone(one), _backbone(two))
    print(f"max |1 process - 2 processes| over the clean backbone = {diff:.2e}")
    assert diff <= TOLERANCE
    base = load_file(Path(inputs[0].dir) / "model.safetensors")
    assert _max_diff(base, _backbone(two)) > 100 * TOLERANCE, "the backbone did not train"
    # the vector that comes out is bit for bit the one that went in (every rank asserted it in training, too)
    loaded = load_file(micro_vector / VECTOR_NAME / "adapter_model.safetensors")
    for result in (one, two):
        saved = load_file(Path(result.guarded.dir) / "adapters" / VECTOR_NAME / "adapter_model.safetensors")
        assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in loaded)
    # the same steps and losses (rank 0's log, the gathered mean over ranks), and probes measured on rank 0
    losses = [[(r["step"], r["loss"]) for r in res.history if "loss" in r] for res in (one, two)]
    assert [s for s, _ in losses[0]] == [s for s, _ in losses[1]] == [1, 2, 3, 4, 5, 6]
    loss_diff = max(abs(a - b) for (_, a), (_, b) in zip(*losses, strict=True))
    assert [p["step"] for p in one.probes] == [p["step"] for p in two.probes] == [0, 3, 6]
    assert all(p.keys() == q.keys() for p, q in zip(one.probes, two.probes, strict=True))
    probe_diff = max(abs(p[k] - q[k]) for p, q in zip(one.probes, two.probes, strict=True) for k in p)
    print(f"max |1 - 2 processes|: logged loss {loss_diff:.2e}, probe losses {probe_diff:.2e}")
    assert loss_diff < 1e-4 and probe_diff < 1e-4

    # The stage, killed in 2 processes right after checkpoint-4 (rank 0 SIGKILLed), then run again.
    base, vector, data = inputs
    out = finetune_backbone.out_dir(base, vector, data, _cfg(2), RUNTIME)
    killed = _job(inputs, 2, out, callbacks=["launch_helpers:KillRank0AfterCheckpoint"])
    with pytest.raises(LaunchError, match="torchrun exited with 1") as err:
        launch_finetune(killed, env={"PYTHONPATH": str(TESTS)}, timeout=300)
    assert "Signal 9" in str(err.value) or "exitcode  : -9" in str(err.value), str(err.value)
    assert (out / "trainer" / "checkpoint-4" / "trainer_state.json").is_file()
    assert not is_done(out) and not (out / "guarded").exists()

    resumed = finetune_backbone.task.fn(base, vector, data, _cfg(2), RUNTIME)
    assert f"resuming from {out / 'trainer' / 'checkpoint-4'}" in caplog.text
    assert is_done(out) and not list((out / "trainer").glob("checkpoint-*"))
    resume_diff = _max_diff(_backbone(two), _backbone(resumed))
    print(f"max |2 processes - 2 processes killed and resumed| = {resume_diff:.2e}")
    assert resume_diff <= 1e-6


@pytest.mark.slow
def test_a_failing_rank_raises_a_clear_error_and_finishes_nothing(inputs, tmp_path):
    base, vector, _ = inputs
    bad = tmp_path / "bad-data"
    bad.mkdir()
    (bad / "finetune.jsonl").write_text('{"id": "x", "role": "finetune"}\n')  # not an example
    bad_data = DataRef(dir=str(bad), md5="bad")
    with pytest.raises(LaunchError) as err:
        finetune_backbone.task.fn(base, vector, bad_data, _cfg(2), RUNTIME)
    message = str(err.value)
    print(message)
    assert "torchrun exited with 1" in message
    assert "rank 0 (errors/rank0.txt)" in message and "rank 1 (errors/rank1.txt)" in message
    assert "finetune.jsonl:1" in message  # the rank's own error, not only torchrun's summary
    assert not is_done(finetune_backbone.out_dir(base, vector, bad_data, _cfg(2), RUNTIME))


def test_the_global_batch_must_split_over_the_processes():
    with pytest.raises(ValueError, match="multiple of launcher.nproc 3"):
        FinetuneConfig(train=TrainConfig(batch_size=8), launcher=LauncherConfig(nproc=3))
    with pytest.raises(ValueError, match="needs runtime.device cuda"):
        launch_finetune(FinetuneJob(base=ModelRef(dir="/b", sha256="b"), data=DataRef(dir="/d", md5="d"),
                                    cfg=FinetuneConfig(train=TrainConfig(batch_size=8),
                                                       launcher=LauncherConfig(nproc=2, backend="nccl")),
                                    hardware=HW, out="/nonexistent"))


@pytest.mark.slow
def test_one_rank_failing_or_a_hung_run_stops_all_with_the_reason(tmp_path):
    (tmp_path / "flaky.py").write_text(
        "import os, time\n"
        "if os.environ['RANK'] == '1':\n"
        "    raise RuntimeError('rank 1 is broken')\n"
        "time.sleep(120)\n")
    (tmp_path / "hung.py").write_text("import time\ntime.sleep(120)\n")
    env = {"PYTHONPATH": str(tmp_path)}
    with pytest.raises(LaunchError, match="torchrun exited with 1") as err:
        torchrun("flaky", [], 2, tmp_path / "flaky-run", env=env, timeout=100)
    assert "RuntimeError: rank 1 is broken" in str(err.value)  # rank 1's stderr, in the output's tail
    with pytest.raises(LaunchError, match="stopped after the timeout of 15 s"):
        torchrun("hung", [], 2, tmp_path / "hung-run", env=env, timeout=15)


@pytest.mark.slow
def test_task_lora_mode_in_two_processes_matches_one(inputs, tmp_path):
    # the backbone frozen, a trainable task LoRA beside the frozen vector (seeded from the config)
    cfg = FinetuneConfig(mode="lora", train=TRAIN.model_copy(update={"max_steps": 4, "save_steps": 0}),
                         launcher=LauncherConfig(nproc=2, backend="gloo"))
    base, vector, data = inputs
    jobs = [FinetuneJob(base=base, vector=vector, data=data, cfg=cfg, hardware=HW, out=str(tmp_path / name))
            for name in ("one", "two")]
    one, two = _one_process(jobs[0]), launch_finetune(jobs[1], timeout=300)
    task = [load_file(Path(r.guarded.dir) / "adapters" / "task" / "adapter_model.safetensors") for r in (one, two)]
    diff = _max_diff(*task)
    print(f"task-LoRA mode: max |1 process - 2 processes| over the task LoRA = {diff:.2e}")
    assert diff <= TOLERANCE
    assert _max_diff(_backbone(one), load_file(Path(base.dir) / "model.safetensors")) == 0  # frozen
