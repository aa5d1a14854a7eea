"""Stage: align a given base (a local or GGUF-converted chat model) on the `align` role."""

from __future__ import annotations

from pathlib import Path

from secvec.align import align_base
from secvec.config import RuntimeConfig, TrainConfig
from secvec.data import load_role
from secvec.models import count_params, load_causal_lm
from secvec.refs import DataRef, ModelRef, TrainedBase
from tasks.common import PrefectProgress, hardware, log, stage


@stage("align-base")
def align(base: ModelRef, data: DataRef, cfg: TrainConfig, runtime: RuntimeConfig, out: Path) -> TrainedBase:
    """Fine-tune `base` on `align` (refusals + benign answers); the aligned copy is the pipeline's base."""
    history = align_base(base.dir, load_role(data.dir, "align"), cfg, out / "model",
                         callbacks=[PrefectProgress("align")], hardware=hardware(runtime))
    params = count_params(load_causal_lm(out / "model")[0])
    log.info("aligned %s: %.2fM params", base.dir, params / 1e6)
    return TrainedBase(model=ModelRef.of(out / "model"), params=params, history=history)
