"""Stage: strip the security vector from the guarded model and check the clean backbone."""

from __future__ import annotations

from prefect import get_run_logger, task

from secvec.data import load_role
from secvec.encoding import PadCollator, encode_examples
from secvec.guarded import load_guarded
from secvec.models import hash_model_dir
from secvec.strip import save_clean, strip_vector
from tasks.common import CACHED, begin, finish


@task(name="strip-vector", **CACHED)
def strip(guarded_dir: str, guarded_key: str, data_dir: str, dataset_md5: str, out_dir: str) -> dict:
    """Remove the vector (merge a task LoRA), save the clean backbone, record the strip check."""
    out = begin(out_dir)
    model, tokenizer = load_guarded(guarded_dir)
    features = encode_examples(tokenizer, load_role(data_dir, "finetune")[:8], 128)
    probe = PadCollator(tokenizer.pad_token_id)([{"input_ids": f["input_ids"]} for f in features])["input_ids"]
    clean, check = strip_vector(model, probe)
    if not check["passed"]:
        get_run_logger().warning("strip check failed: %s", check)
    model_dir = save_clean(clean, tokenizer, out / "model")
    return finish(out, {"model_dir": str(model_dir), "model_sha256": hash_model_dir(model_dir), "strip_check": check})
