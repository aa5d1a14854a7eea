"""Stage: bootstrap the small aligned base (only when the config names no model directory)."""

from __future__ import annotations

from prefect import get_run_logger, task

from secvec.bootstrap import BootstrapConfig, bootstrap_base
from secvec.data import TRAIN_ROLES, load_role
from secvec.models import count_params, hash_model_dir, load_causal_lm
from tasks.common import CACHED, PrefectProgress, begin, finish


@task(name="bootstrap-base", **CACHED)
def bootstrap(data_dir: str, dataset_md5: str, cfg: dict, out_dir: str) -> dict:
    """Train the base of `cfg.size` on the `align` role; cached by dataset md5 and config."""
    config = BootstrapConfig(**cfg)
    out = begin(out_dir)
    # The vocabulary covers all training text (as a real tokenizer would); the model trains on `align`.
    vocab = [m["content"] for role in TRAIN_ROLES for ex in load_role(data_dir, role) for m in ex["messages"]]
    model_dir = out / "model"
    history = bootstrap_base(load_role(data_dir, "align"), config, model_dir, vocab,
                             callbacks=[PrefectProgress("bootstrap")])
    params = count_params(load_causal_lm(model_dir)[0])
    get_run_logger().info("bootstrapped %s base: %.2fM params", config.size, params / 1e6)
    return finish(out, {"model_dir": str(model_dir), "model_sha256": hash_model_dir(model_dir),
                        "params": params, "history": history})
