"""Callbacks the launcher tests hand to torchrun ranks by import path (`FinetuneJob.callbacks`); the ranks
import this module through PYTHONPATH."""

import os
import signal

from transformers import TrainerCallback

KILL_AT_STEP = 4


class KillRank0AfterCheckpoint(TrainerCallback):
    """SIGKILL rank 0 once checkpoint-4 is written: no cleanup, like an OOM kill or a lost node."""

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == KILL_AT_STEP and state.is_world_process_zero:
            os.kill(os.getpid(), signal.SIGKILL)
