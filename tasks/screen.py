"""Stage: vector screening, scoring every fine-tuning sample by what the vector explains of it (report), and
leaving those above the threshold out of guarded fine-tuning (drop)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from secvec.config import RuntimeConfig, ScreenConfig
from secvec.data import load_role
from secvec.data.build import with_finetune
from secvec.refs import DataRef, ModelRef, VectorRef
from secvec.screen import balanced_threshold, screen_report, vector_scores
from secvec.vector import kl_examples, load_with_vector
from tasks.common import hardware, log, stage


class Screened(BaseModel):
    """The screen's report, and the data guarded fine-tuning trains on (screened in `drop` mode)."""

    model_config = ConfigDict(frozen=True)

    report: dict
    data: DataRef


@stage("screen")
def screen(base: ModelRef, vector: VectorRef, data: DataRef, cfg: ScreenConfig, runtime: RuntimeConfig,
           out: Path) -> Screened:
    """Score the fine-tuning set; the threshold, unless configured, from `sv_val` vs the KL's benign chats."""
    hw = hardware(runtime)
    guarded, tokenizer = load_with_vector(base.dir, vector.dir, base.sha256, hw.device, hw.compute_dtype)
    examples = load_role(data.dir, "finetune")
    threshold = cfg.threshold
    calibration = {}
    if threshold is None:
        if not load_role(data.dir, "sv_val"):
            raise ValueError("screen.threshold: no `sv_val` pairs to calibrate the threshold on; set "
                             "screen.threshold or screen.mode: off")
        harmful = vector_scores(guarded, tokenizer, load_role(data.dir, "sv_val"))
        benign = vector_scores(guarded, tokenizer, kl_examples(data.dir, max(len(harmful), 1)))
        threshold = balanced_threshold(harmful, benign)
        calibration = {"sv_val": len(harmful), "benign": len(benign)}
    scores = vector_scores(guarded, tokenizer, examples)
    report = {**screen_report(examples, scores, threshold, cfg.top), "mode": cfg.mode, "calibration": calibration}
    log.info("screen: %d of %d samples above %.3f (AUROC against the labels %s)", report["flagged"],
             report["n"], threshold, report["auroc"])
    if cfg.mode != "drop":
        return Screened(report=report, data=data)
    kept = [ex for ex, score in zip(examples, scores, strict=True) if score <= threshold]
    screened = with_finetune(data.dir, kept, out / "data", {"screened_from": data.md5, "threshold": threshold})
    return Screened(report={**report, "kept": len(kept)}, data=DataRef.of(screened))
