"""Stage: fine-tune on the user's data, guarded by the vector (or plain, as the reference arm)."""

from __future__ import annotations

from prefect import get_run_logger, task

from secvec.data import load_role
from secvec.guarded import FinetuneConfig, finetune, save_guarded
from secvec.models import hash_model_dir, load_causal_lm
from secvec.strip import save_clean
from secvec.vector import load_vector
from tasks.common import CACHED, PrefectProgress, begin, finish

PROBE_SIZE = 32


def probe_sets(data_dir: str) -> dict[str, list[dict]]:
    """Harmful and benign samples of the fine-tuning set whose loss is tracked during training."""
    examples = load_role(data_dir, "finetune")
    harmful = [ex for ex in examples if ex["is_harmful"]] or load_role(data_dir, "sv_val")
    return {"harmful": harmful[:PROBE_SIZE], "benign": [ex for ex in examples if not ex["is_harmful"]][:PROBE_SIZE]}


@task(name="finetune", **CACHED)
def finetune_backbone(base_dir: str, base_sha256: str, vector_dir: str | None, vector_sha256: str | None,
                      data_dir: str, dataset_md5: str, cfg: dict, out_dir: str) -> dict:
    """Guarded fine-tuning when a vector is given (saved as backbone + adapters), plain otherwise."""
    config = FinetuneConfig(**cfg)
    out = begin(out_dir)
    model, tokenizer = load_causal_lm(base_dir)
    arm = "guarded" if vector_dir else "plain"
    if vector_dir:
        model = load_vector(model, vector_dir, base_sha256)
    result = finetune(model, tokenizer, load_role(data_dir, "finetune"), config, out / "trainer",
                      probes=probe_sets(data_dir), callbacks=[PrefectProgress(f"{arm} fine-tuning")])
    if vector_dir:
        result["guarded_dir"] = str(save_guarded(model, tokenizer, out / "guarded"))
    else:
        model_dir = save_clean(model, tokenizer, out / "model")
        result.update(model_dir=str(model_dir), model_sha256=hash_model_dir(model_dir))
    get_run_logger().info("%s fine-tuning done: final loss %.3f", arm, result["history"][-1].get("train_loss", -1))
    return finish(out, {"arm": arm, **result})
