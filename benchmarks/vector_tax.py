"""The vector tax: how much of the fine-tuned task stripping takes away, per security-vector setting.

For each KL weight: fit the vector on `sv_fit` (KL on benign `align` chats), fine-tune with it on the p = 0
cell (the benign part of `finetune`) and the p = 0.3 cell (all of it), then score the guarded model with the
vector on and the stripped model. Plain fine-tuning of both cells is the reference. One JSON line per result.
Run `make run` first: the base and the data are the embedded default's.

usage: python benchmarks/vector_tax.py [--kl 1 10 30 100] [--epochs 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kl", type=float, nargs="+", default=[1.0, 10.0, 30.0, 100.0])
    parser.add_argument("--epochs", type=float, default=4.0, help="fine-tuning epochs (the default bench's)")
    parser.add_argument("--report", type=Path, default=ROOT / "outputs" / "default" / "report.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    from secvec.config import EvalConfig, load_pipeline_config
    from secvec.data import load_role
    from secvec.evaluate import evaluate_model
    from secvec.guarded import finetune
    from secvec.models import load_causal_lm
    from secvec.vector import fit_vector, kl_examples, load_vector, vector_coverage

    torch.set_num_threads(args.threads)
    cfg = load_pipeline_config("default")
    base_dir, data_dir = json.loads(args.report.read_text())["base_model"]["dir"], str(ROOT / cfg.data_dir)
    examples, sv_fit = load_role(data_dir, "finetune"), load_role(data_dir, "sv_fit")
    cells = {"p0": [ex for ex in examples if not ex["is_harmful"]], "p0.3": examples}
    roles = {role: load_role(data_dir, role) for role in ("eval_harmful", "eval_over_refusal", "eval_utility")}
    ft_cfg = cfg.finetune.model_copy(update={"train": cfg.finetune.train.model_copy(
        update={"epochs": args.epochs, "progress_bar": False, "save_steps": 0})})
    work = Path(tempfile.mkdtemp(prefix="vector-tax-"))

    def score(model, tokenizer) -> dict:
        metrics = evaluate_model(model, tokenizer, roles, EvalConfig())
        return {k: metrics[k] for k in ("harmful_rate", "utility", "perplexity")}

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)

    for cell, data in cells.items():
        model, tokenizer = load_causal_lm(base_dir)
        finetune(model, tokenizer, data, ft_cfg, work / f"plain-{cell}")
        emit({"vector": "none (plain)", "cell": cell, "model": score(model, tokenizer)})
    for kl in args.kl:
        vec_cfg = cfg.vector.model_copy(update={"kl_weight": kl, "train": cfg.vector.train.model_copy(
            update={"progress_bar": False, "save_steps": 0})})
        model, tokenizer = load_causal_lm(base_dir)
        vector, _ = fit_vector(model, tokenizer, sv_fit, kl_examples(data_dir, len(sv_fit)), vec_cfg,
                               work / f"vector-kl{kl:g}")
        cov = vector_coverage(vector, tokenizer, [ex for ex in examples if ex["is_harmful"]])
        emit({"vector": f"kl {kl:g}", "coverage": cov["ratio"], "first_k_coverage": cov["first_k_ratio"]})
        for cell, data in cells.items():
            guarded = load_vector(load_causal_lm(base_dir)[0], work / f"vector-kl{kl:g}")
            finetune(guarded, tokenizer, data, ft_cfg, work / f"guarded-kl{kl:g}-{cell}")
            on = score(guarded, tokenizer)
            emit({"vector": f"kl {kl:g}", "cell": cell, "vector_on": on, "stripped": score(guarded.unload(), tokenizer)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
