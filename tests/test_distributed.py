"""Guarded fine-tuning runs unchanged under torchrun: 2 CPU processes (DDP, gloo) end with identical
weights, and the security vector is bit-identical to the one loaded."""

import json
from pathlib import Path

import pytest
import torch

from secvec.guarded import vector_snapshot
from secvec.launch import torchrun
from secvec.models import load_causal_lm
from secvec.vector import load_vector

TESTS = Path(__file__).parent
WORKER = "ddp_worker"  # tests/ddp_worker.py, imported by the ranks through PYTHONPATH


@pytest.mark.slow
def test_two_ranks_end_identical_with_the_vector_untouched(micro_base, micro_vector, world, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(world["harmful_ft"] + world["benign_ft"]))  # 144 examples
    # The launcher's torchrun (secvec.launch): output streamed to the log, a LaunchError with each failing
    # rank's traceback. Unlike tests/test_launch.py (the stage, global batch split over the ranks), this runs
    # `guarded.finetune` itself on each rank (batch 8 per rank) and checks every rank's replica.
    torchrun(WORKER, [str(micro_base), str(micro_vector), str(data), str(tmp_path)], 2, tmp_path / "launch",
             env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}, timeout=180)

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # 144 examples / (2 ranks x batch 8) = 9 steps per epoch, 2 epochs: each rank saw half of the data.
    assert [r["steps"] for r in ranks] == [18, 18]
    a, b = ranks[0]["backbone"], ranks[1]["backbone"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "replicas diverged"

    base, _ = load_causal_lm(micro_base)
    assert any(not torch.equal(v, a[k]) for k, v in base.state_dict().items()), "the backbone did not train"
    loaded = vector_snapshot(load_vector(base, micro_vector))
    for rank in ranks:
        assert rank["vector"].keys() == loaded.keys()
        assert all(torch.equal(rank["vector"][k], loaded[k]) for k in loaded)
