"""Where does guarding's over-refusal come from? The pipeline's models scored with and without the vector.

Guarded fine-tuning trains the backbone beside a frozen vector. Wherever the vector moves benign outputs
(the KL term keeps it small, never zero), the backbone is trained to undo that move; stripping then removes
the vector and leaves the undoing: an "anti-vector" in the backbone. If the vector pushes towards compliance,
its opposite pushes towards refusal, on harmful and look-alike prompts alike. This script tells that apart
from the other candidates (the vector itself refusing, or the task data) by scoring five views of one run on
every harmful and over-refusal prompt (and the task):

  base                  the aligned base
  base + vector         what the vector alone does to it
  plain                 fine-tuned without the vector
  guarded (vector on)   the guarded model as it trained
  clean                 the guarded model stripped (what the pipeline registers)

The anti-vector reading predicts: base + vector refuses less than base, guarded ~ plain, clean > plain.
Every model comes from the pipeline's cached stages (a finished `secvec run --config X` makes this cheap;
missing stages are computed and cached). One JSON line per view, then the verdict.

usage: python benchmarks/over_refusal.py --config public [--threads 1] [--max-per-role 100]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRICS = ("harmful_rate", "harmful_refusal_rate", "over_refusal_rate", "utility", "task_answer_rate_harmful")


def verdict(views: dict[str, dict]) -> dict:
    """Differences between views (a - b) that the anti-vector reading predicts; None where a rate is missing."""
    def rate(view: str, key: str) -> float | None:
        return views[view].get(key)

    def delta(a: str, b: str, key: str = "over_refusal_rate") -> float | None:
        x, y = rate(a, key), rate(b, key)
        return None if x is None or y is None else round(x - y, 4)

    return {
        "vector_minus_base_harmful_refusal": delta("base + vector", "base", "harmful_refusal_rate"),
        "vector_minus_base_over_refusal": delta("base + vector", "base"),
        "guarded_minus_plain_over_refusal": delta("guarded (vector on)", "plain"),
        "clean_minus_plain_over_refusal": delta("clean", "plain"),
        "clean_minus_guarded_over_refusal": delta("clean", "guarded (vector on)"),
        "clean_minus_guarded_harmful_refusal": delta("clean", "guarded (vector on)", "harmful_refusal_rate"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="public", help="pipeline preset or YAML (its cached stages are used)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's)")
    parser.add_argument("--max-per-role", type=int, default=None, help="prompts per role (default: all)")
    args = parser.parse_args(argv)

    from flows.environment import configure

    configure()
    from prefect import flow

    from flows.pipeline import resolve_base
    from secvec.config import load_pipeline_config, with_runtime
    from secvec.data import EVAL_ROLES, load_role
    from secvec.device import start
    from secvec.evaluate import evaluate_model
    from secvec.guarded import load_guarded
    from secvec.models import load_causal_lm
    from secvec.vector import load_with_vector
    from tasks.data import prepare_data
    from tasks.evaluate import with_judge
    from tasks.finetune import finetune_backbone, guarded_data, plain_reference
    from tasks.strip import strip
    from tasks.vector import fit_security_vector

    @flow(name="secvec-over-refusal-diagnostic")
    def diagnose() -> dict[str, dict]:
        cfg = with_runtime(load_pipeline_config(args.config), {"threads": args.threads} if args.threads else {})
        rt, hw = start(cfg.runtime)
        data = prepare_data(str(cfg.data), str(cfg.data_dir) if cfg.data_dir else None)
        base, _ = resolve_base(cfg, data, rt, {})
        vector = fit_security_vector(base, data, cfg.vector, rt).vector
        train = guarded_data(data, data, cfg.finetune)  # as the pipeline: + the alignment replay, if configured
        guarded = finetune_backbone(base, vector, train, cfg.finetune, rt)
        clean = strip(guarded.guarded, train, rt)
        plain = finetune_backbone(base, None, data, plain_reference(cfg.finetune), rt)
        eval_cfg = with_judge(cfg.eval, cfg.data, rt)
        if args.max_per_role:
            eval_cfg = eval_cfg.model_copy(update={"max_per_role": args.max_per_role})
        roles = {r: load_role(data.dir, r) for r in EVAL_ROLES}
        loaders = {
            "base": lambda: load_causal_lm(base.dir, device=hw.device),
            "base + vector": lambda: load_with_vector(base.dir, vector.dir, base.sha256, device=hw.device),
            "plain": lambda: load_causal_lm(plain.model.dir, device=hw.device),
            "guarded (vector on)": lambda: load_guarded(guarded.guarded.dir, device=hw.device),
            "clean": lambda: load_causal_lm(clean.model.dir, device=hw.device),
        }
        views = {}
        for view, load in loaders.items():
            model, tokenizer = load()
            metrics = evaluate_model(model, tokenizer, roles, eval_cfg)
            views[view] = {k: metrics[k] for k in METRICS} | {"n": metrics["n"]}
            print(json.dumps({"config": cfg.name, "view": view, **views[view]}), flush=True)
        return views

    print(json.dumps({"verdict": verdict(diagnose())}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
