"""One rank of the distributed test: guarded fine-tuning under `torchrun --nproc_per_node 2` (gloo, CPU).

usage: torchrun --nproc_per_node 2 ddp_worker.py BASE_DIR VECTOR_DIR DATA_JSON OUT_DIR

Each rank saves `rank<N>.pt`: its final backbone weights, its vector weights and the world size it saw.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from secvec.guarded import FinetuneConfig, finetune, vector_snapshot
from secvec.models import load_causal_lm
from secvec.training import TrainConfig
from secvec.vector import load_vector


def main() -> None:
    base_dir, vector_dir, data_json, out_dir = sys.argv[1:5]
    torch.set_num_threads(1)  # two ranks share two cores
    model, tokenizer = load_causal_lm(base_dir)
    model = load_vector(model, vector_dir)
    cfg = FinetuneConfig(train=TrainConfig(learning_rate=1e-3, epochs=2, batch_size=8, weight_decay=0.01, seed=7,
                                           progress_bar=False))
    examples = json.loads(Path(data_json).read_text())
    out = finetune(model, tokenizer, examples, cfg, Path(out_dir) / "trainer")
    backbone = {k.replace(".base_layer.", "."): v.clone() for k, v in model.get_base_model().state_dict().items()
                if "lora_" not in k}
    torch.save({"backbone": backbone, "vector": vector_snapshot(model),
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "steps": max(r["step"] for r in out["history"])},
               Path(out_dir) / f"rank{os.environ.get('RANK', '0')}.pt")


if __name__ == "__main__":
    main()
