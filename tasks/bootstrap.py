"""Stage: bootstrap the small aligned base (only when the config names no model directory)."""

from __future__ import annotations

from pathlib import Path

from secvec.bootstrap import bootstrap_base
from secvec.config import BootstrapConfig, RuntimeConfig
from secvec.data import TRAIN_ROLES, load_role
from secvec.models import count_params, load_causal_lm
from secvec.refs import DataRef, ModelRef, TrainedBase
from tasks.common import PrefectProgress, hardware, log, stage


@stage("bootstrap-base")
def bootstrap(data: DataRef, cfg: BootstrapConfig, runtime: RuntimeConfig, out: Path) -> TrainedBase:
    """Train the base of `cfg.size` on the `align` role."""
    # The vocabulary covers all training text (as a real tokenizer would); the model trains on `align`.
    vocab = [m["content"] for role in TRAIN_ROLES for ex in load_role(data.dir, role) for m in ex["messages"]]
    history = bootstrap_base(load_role(data.dir, "align"), cfg, out / "model", vocab,
                             callbacks=[PrefectProgress("bootstrap")], hardware=hardware(runtime))
    params = count_params(load_causal_lm(out / "model")[0])
    log.info("bootstrapped %s base: %.2fM params", cfg.size, params / 1e6)
    return TrainedBase(model=ModelRef.of(out / "model"), params=params, history=history)
