"""Stage: fine-tune on the user's data, guarded by the vector (or plain, as the reference arm)."""

from __future__ import annotations

from pathlib import Path

from secvec.config import FinetuneConfig, RuntimeConfig
from secvec.launch import FinetuneJob, launch_finetune, run_finetune
from secvec.refs import DataRef, FinetuneResult, ModelRef, VectorRef
from tasks.common import PrefectProgress, hardware, stage


@stage("finetune")
def finetune_backbone(base: ModelRef, vector: VectorRef | None, data: DataRef, cfg: FinetuneConfig,
                      runtime: RuntimeConfig, out: Path) -> FinetuneResult:
    """Guarded fine-tuning when a vector is given (saved as backbone + adapters), plain otherwise.

    One process, or `cfg.launcher.nproc` torchrun processes running the same `run_finetune` (secvec.launch):
    rank 0 saves and measures the probes; the Prefect progress artifact is shown for one process only.
    """
    job = FinetuneJob(base=base, vector=vector, data=data, cfg=cfg, hardware=hardware(runtime), out=str(out))
    if cfg.launcher.nproc > 1:
        return launch_finetune(job)
    return run_finetune(job, callbacks=[PrefectProgress(f"{'guarded' if vector else 'plain'} fine-tuning")])
