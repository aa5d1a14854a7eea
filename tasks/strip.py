"""Stage: strip the security vector from the guarded model and check the clean backbone."""

from __future__ import annotations

from pathlib import Path

from secvec.config import RuntimeConfig
from secvec.data import load_role
from secvec.guarded import load_guarded
from secvec.refs import CleanModel, DataRef, GuardedRef, ModelRef
from secvec.strip import probe_batch, save_clean, strip_vector
from tasks.common import hardware, log, stage


@stage("strip-vector")
def strip(guarded: GuardedRef, data: DataRef, runtime: RuntimeConfig, out: Path) -> CleanModel:
    """Remove the vector (merge a task LoRA), save the clean backbone, record the strip check."""
    model, tokenizer = load_guarded(guarded.dir, device=hardware(runtime).device)  # float32: the check is exact
    clean, check = strip_vector(model, probe_batch(tokenizer, load_role(data.dir, "finetune")[:8]))
    if not check["passed"]:
        log.warning("strip check failed: %s", check)
    return CleanModel(model=ModelRef.of(save_clean(clean, tokenizer, out / "model")), strip_check=check)
