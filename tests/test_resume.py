"""A guarded fine-tuning run killed with SIGKILL resumes from its checkpoint and ends where an
uninterrupted run ends."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("resume_worker.py")


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKER), *map(str, args)], capture_output=True, text=True,
                          timeout=600, check=False)


def test_killed_run_resumes_to_the_same_clean_backbone(micro_base, micro_vector, world, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(world["harmful_ft"] + world["benign_ft"]))  # 144 examples: 18 steps

    whole = _run(micro_base, micro_vector, data, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]

    killed = _run(micro_base, micro_vector, data, tmp_path / "resumed", 10)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-4", "checkpoint-8"]

    resumed = _run(micro_base, micro_vector, data, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resume from: " + str(tmp_path / "resumed" / "checkpoint-8") in resumed.stdout
    assert not list((tmp_path / "resumed").glob("checkpoint-*")), "checkpoints are removed after success"

    a = torch.load(tmp_path / "whole" / "clean.pt")
    b = torch.load(tmp_path / "resumed" / "clean.pt")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |uninterrupted - resumed| = {diff:.2e}")
    assert diff <= 1e-6
