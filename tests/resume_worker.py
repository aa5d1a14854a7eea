"""Subprocess for the kill-and-resume test: guarded fine-tuning that may SIGKILL itself at a given step.

usage: python resume_worker.py BASE_DIR VECTOR_DIR DATA_JSON OUT_DIR [KILL_AT_STEP]
"""

import json
import os
import signal
import sys

import torch
from transformers import TrainerCallback

from secvec.guarded import FinetuneConfig, finetune
from secvec.models import load_causal_lm
from secvec.strip import strip_vector
from secvec.training import TrainConfig, last_checkpoint
from secvec.vector import load_vector


class KillAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, like an OOM kill or a lost node


def main() -> None:
    base_dir, vector_dir, data_json, out_dir = sys.argv[1:5]
    kill_at = int(sys.argv[5]) if len(sys.argv) > 5 else None
    model, tokenizer = load_causal_lm(base_dir)
    model = load_vector(model, vector_dir)
    cfg = FinetuneConfig(train=TrainConfig(learning_rate=1e-3, epochs=2, batch_size=16, weight_decay=0.01,
                                           save_steps=4, seed=5, progress_bar=False))
    with open(data_json) as fh:
        examples = json.load(fh)
    print(f"resume from: {last_checkpoint(out_dir)}", flush=True)
    finetune(model, tokenizer, examples, cfg, out_dir, callbacks=[KillAt(kill_at)] if kill_at else [])
    probe = torch.tensor([[1, 2, 3]])
    clean, _ = strip_vector(model, probe)
    torch.save(clean.state_dict(), os.path.join(out_dir, "clean.pt"))


if __name__ == "__main__":
    main()
