"""Stage: fine-tune on the user's data, guarded by the vector (or plain, as the reference arm)."""

from __future__ import annotations

from pathlib import Path

from secvec.config import FinetuneConfig, RuntimeConfig
from secvec.data import load_role
from secvec.data.build import replay_examples, with_finetune
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


@stage("replay-align")
def with_replay(data: DataRef, aligned_on: DataRef, n: int, seed: int, out: Path) -> DataRef:
    """`data` with n chats of `aligned_on`'s `align` role (the base's alignment data) added to its fine-tuning
    set (`finetune.replay`): a derived dataset version, as screening's."""
    align = load_role(aligned_on.dir, "align") if (aligned_on.path / "align.jsonl").is_file() else []
    if not align:
        raise ValueError(f"finetune.replay {n}: {aligned_on.dir} has no `align` role to replay; set finetune.replay: 0")
    examples = [*load_role(data.dir, "finetune"), *replay_examples(align, n, seed)]
    return DataRef.of(with_finetune(data.dir, examples, out / "data", {"replayed_into": data.md5, "replay": n,
                                                                      "align_md5": aligned_on.md5, "seed": seed}))


def guarded_data(data: DataRef, aligned_on: DataRef, cfg: FinetuneConfig) -> DataRef:
    """What guarded fine-tuning trains on: `data`, plus the configured replay of the alignment data."""
    return with_replay(data, aligned_on, cfg.replay, cfg.train.seed) if cfg.replay else data


def unguarded(cfg: FinetuneConfig) -> FinetuneConfig:
    """The same fine-tuning without what the defense adds to it (the alignment replay): what plain fine-tuning,
    the reference and the attacker's arm, trains with."""
    return cfg.model_copy(update={"replay": 0})


def plain_reference(cfg: FinetuneConfig) -> FinetuneConfig:
    """The plain reference's fine-tuning: the pipeline's own training, full, unguarded."""
    return unguarded(cfg.model_copy(update={"mode": "full"}))
