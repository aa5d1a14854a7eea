"""Stages: fit the security vector, then check how well it covers the harmful samples it must block."""

from __future__ import annotations

from prefect import get_run_logger, task

from secvec.data import load_role
from secvec.models import load_causal_lm
from secvec.vector import VectorConfig, fit_vector, load_vector, vector_coverage
from tasks.common import CACHED, PrefectProgress, begin, finish


def kl_examples(data_dir: str, n: int) -> list[dict]:
    """Benign chats for the KL term: the base's own benign alignment data, else the user's benign data."""
    benign = [ex for ex in load_role(data_dir, "align") if not ex["is_harmful"]]
    benign = benign or [ex for ex in load_role(data_dir, "finetune") if not ex["is_harmful"]]
    return benign[:n]


@task(name="fit-security-vector", **CACHED)
def fit_security_vector(base_dir: str, base_sha256: str, data_dir: str, dataset_md5: str, cfg: dict,
                        out_dir: str) -> dict:
    """Fit the vector on `sv_fit` with the backbone frozen; cached by base hash, dataset md5, config."""
    config = VectorConfig(**cfg)
    out = begin(out_dir)
    model, tokenizer = load_causal_lm(base_dir)
    harmful = load_role(data_dir, "sv_fit")
    _, meta = fit_vector(model, tokenizer, harmful, kl_examples(data_dir, len(harmful)), config, out / "vector",
                         base_sha256, callbacks=[PrefectProgress("security vector")],
                         validation=load_role(data_dir, "sv_val"))
    get_run_logger().info("vector fitted on %d harmful samples, final loss %.3f", meta["n_harmful"],
                          meta["final_loss"])
    return finish(out, {"vector_dir": str(out / "vector"), "vector_sha256": meta["weights_sha256"], **meta})


@task(name="vector-coverage", **CACHED)
def check_coverage(base_dir: str, base_sha256: str, vector_dir: str, vector_sha256: str, data_dir: str,
                   dataset_md5: str, first_k: int = 8) -> dict:
    """Harmful loss with the vector on/off on the fine-tuning set's harmful samples and on `sv_val`."""
    model, tokenizer = load_causal_lm(base_dir)
    guarded = load_vector(model, vector_dir, base_sha256)
    attack = [ex for ex in load_role(data_dir, "finetune") if ex["is_harmful"]]
    validation = load_role(data_dir, "sv_val")
    result = {
        "finetune": vector_coverage(guarded, tokenizer, attack, first_k) if attack else None,
        "validation": vector_coverage(guarded, tokenizer, validation, first_k) if validation else None,
    }
    for name, cov in result.items():
        if cov:
            get_run_logger().info("coverage on %s: loss on %.3f / off %.3f = %.3f (first %d tokens: %.3f)", name,
                                  cov["loss_on"], cov["loss_off"], cov["ratio"], first_k, cov["first_k_ratio"])
    return result
