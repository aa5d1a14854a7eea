"""Stage: fine-tune on the user's data, guarded by the vector (or plain, as the reference arm)."""

from __future__ import annotations

from pathlib import Path

from secvec.config import FinetuneConfig, RuntimeConfig
from secvec.data import load_role
from secvec.guarded import finetune, guarded_sha256, probe_sets, save_guarded
from secvec.models import load_causal_lm
from secvec.refs import DataRef, FinetuneResult, GuardedRef, ModelRef, VectorRef
from secvec.strip import save_clean
from secvec.vector import load_vector
from tasks.common import PrefectProgress, hardware, log, stage


@stage("finetune")
def finetune_backbone(base: ModelRef, vector: VectorRef | None, data: DataRef, cfg: FinetuneConfig,
                      runtime: RuntimeConfig, out: Path) -> FinetuneResult:
    """Guarded fine-tuning when a vector is given (saved as backbone + adapters), plain otherwise."""
    hw = hardware(runtime)
    model, tokenizer = load_causal_lm(base.dir, device=hw.device)  # float32 master weights
    arm = "guarded" if vector else "plain"
    if vector:
        model = load_vector(model, vector.dir, base.sha256)
    result = finetune(model, tokenizer, load_role(data.dir, "finetune"), cfg, out / "trainer",
                      probes=probe_sets(data.dir), callbacks=[PrefectProgress(f"{arm} fine-tuning")], hardware=hw)
    log.info("%s fine-tuning done: final loss %.3f", arm, result["history"][-1].get("train_loss", -1))
    if vector:
        saved = save_guarded(model, tokenizer, out / "guarded")
        return FinetuneResult(arm=arm, guarded=GuardedRef(dir=str(saved), sha256=guarded_sha256(saved)), **result)
    return FinetuneResult(arm=arm, model=ModelRef.of(save_clean(model, tokenizer, out / "model")), **result)
