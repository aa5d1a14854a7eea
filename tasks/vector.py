"""Stages: fit the security vector, then check how well it covers the harmful samples it must block."""

from __future__ import annotations

from pathlib import Path

from secvec.config import RuntimeConfig, VectorConfig
from secvec.data import load_role
from secvec.models import load_causal_lm
from secvec.refs import DataRef, FittedVector, ModelRef, VectorRef
from secvec.vector import fit_vector, kl_examples, load_with_vector, vector_coverage
from tasks.common import PrefectProgress, hardware, log, stage


@stage("fit-security-vector")
def fit_security_vector(base: ModelRef, data: DataRef, cfg: VectorConfig, runtime: RuntimeConfig,
                        out: Path) -> FittedVector:
    """Fit the vector on `sv_fit` with the backbone frozen (KL on benign chats)."""
    hw = hardware(runtime)
    model, tokenizer = load_causal_lm(base.dir, device=hw.device)  # float32 master weights
    harmful = load_role(data.dir, "sv_fit")
    _, meta = fit_vector(model, tokenizer, harmful, kl_examples(data.dir, len(harmful)), cfg, out / "vector",
                         base.sha256, callbacks=[PrefectProgress("security vector")],
                         validation=load_role(data.dir, "sv_val"), hardware=hw,
                         refusals=[ex for ex in load_role(data.dir, "align") if ex["is_harmful"]])
    log.info("vector fitted on %d harmful samples, final loss %.3f", meta["n_harmful"], meta["final_loss"])
    history = meta.pop("history", [])
    return FittedVector(vector=VectorRef(dir=str(out / "vector"), sha256=meta["weights_sha256"]), history=history,
                        meta=meta)


@stage("vector-coverage")
def check_coverage(base: ModelRef, vector: VectorRef, data: DataRef, first_k: int, runtime: RuntimeConfig,
                   out: Path) -> dict:
    """Harmful loss with the vector on/off on the fine-tuning set's harmful samples and on `sv_val`."""
    hw = hardware(runtime)
    guarded, tokenizer = load_with_vector(base.dir, vector.dir, base.sha256, hw.device, hw.compute_dtype)
    sets = {"finetune": [ex for ex in load_role(data.dir, "finetune") if ex["is_harmful"]],
            "validation": load_role(data.dir, "sv_val")}
    result = {name: vector_coverage(guarded, tokenizer, examples, first_k) if examples else None
              for name, examples in sets.items()}
    for name, cov in result.items():
        if cov:
            log.info("coverage on %s: loss on %.3f / off %.3f = %.3f (first %d tokens: %.3f)", name,
                     cov["loss_on"], cov["loss_off"], cov["ratio"], first_k, cov["first_k_ratio"])
    return result
