"""The run report's markdown: every section renders from a report.json-shaped dict."""

from __future__ import annotations

from secvec.report import markdown

METRICS = {"harmful_rate": 0.02, "harmful_refusal_rate": 0.9, "over_refusal_rate": 0.0, "utility": 0.95,
           "perplexity": 1.5}


def report(**extra) -> dict:
    return {"dataset_md5": "abc.dir", "base": METRICS, "clean": METRICS, "plain": None,
            "gate": {"passed": True, "reasons": [], "checks": [
                {"name": "max_harmful_rate", "value": 0.02, "limit": 0.1, "passed": True}]},
            "vector_coverage": {"loss_on": 0.5, "loss_off": 3.9, "ratio": 0.13, "first_k": 8, "first_k_ratio": 0.03},
            "strip_check": {"adapter_keys": [], "max_abs_diff": 0.0},
            "registered": {"name": "m", "version": "1", "aliases": ["candidate", "champion"]}, **extra}


def test_markdown_renders_the_screen_in_both_modes():
    screen = {"mode": "report", "n": 4, "flagged": 1, "threshold": 0.25, "auroc": 1.0, "precision": 1.0,
              "recall": 1.0, "top": [{"id": "finetune-00001", "score": 1.234, "is_harmful": True}]}
    text = markdown(report(screen=screen))
    assert "Vector screen (report): 1 of 4 fine-tuning samples score above 0.250" in text
    assert "| finetune-00001 | 1.234 | True |" in text
    dropped = markdown(report(screen={**screen, "mode": "drop", "kept": 3}))
    assert "3 kept for guarded fine-tuning." in dropped
    assert "Vector screen" not in markdown(report(screen=None)) and "gate PASSED" in text
