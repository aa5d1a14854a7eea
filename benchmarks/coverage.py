"""How much of a bench's attack does its vector already explain? Coverage on the cells' harmful pairs.

Coverage is the harmful-reply loss with the vector on over the loss with it off (1.0: the vector explains
nothing of these replies), over the whole reply and its first k tokens. This script measures it for a bench
preset's seed-0 vector on:

  cell <name>   the harmful pairs each cell of the bench fine-tunes on (seed 0's draw; cells that train on
                the same examples, like the paper cell and the durability cells, are one set)
  sv_val        the held-out validation pairs (the vector's epoch is chosen on them)
  sv_fit        the vector's own fitting pairs (how far it memorised rather than generalised)

Every model comes from the bench's cached stages (after `secvec bench --config X` this only reads them; a
missing stage is computed and cached). One JSON line per set.

usage: python benchmarks/coverage.py --config smollm2-align-benign-192-eval-64-fixed-pool-sv-32 [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="bench preset (configs/bench/) or bench YAML")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's)")
    parser.add_argument("--first-k", type=int, default=8, help="first reply tokens of the first-k ratio")
    args = parser.parse_args(argv)

    from flows.environment import configure

    configure()
    from prefect import flow

    from flows.pipeline import resolve_base
    from secvec.bench.cells import base_pipeline, expand_cells, pool_sizes, vector_config
    from secvec.config import load_bench_config, load_data_config, load_pipeline_config, with_runtime
    from secvec.data import load_role
    from secvec.device import start
    from secvec.vector import load_with_vector, vector_coverage
    from tasks.bench import attack_pool, cell_data
    from tasks.data import prepare_data
    from tasks.vector import fit_security_vector

    @flow(name="secvec-coverage-diagnostic")
    def measure() -> None:
        cfg = load_bench_config(args.config)
        pipe = with_runtime(load_pipeline_config(cfg.pipeline), {"threads": args.threads} if args.threads else {})
        rt, hw = start(pipe.runtime)
        data = prepare_data(str(pipe.data), str(pipe.data_dir) if pipe.data_dir else None)
        pool = attack_pool(load_data_config(pipe.data), data, *pool_sizes(cfg))
        base, _ = resolve_base(base_pipeline(pipe, 0), data, rt, {})
        vector = fit_security_vector(base, data, vector_config(pipe.vector, 0), rt).vector
        draws: dict[tuple[int, int], str] = {}  # (harmful, benign) -> the first cell that draws them
        for cell in expand_cells(cfg):
            if cell.harmful:
                draws.setdefault((cell.harmful, cell.benign), cell.name)
        sets: dict[str, list[dict]] = {}
        for (harmful, benign), name in draws.items():
            drawn = load_role(cell_data(data, pool, harmful, benign, 0).dir, "finetune")
            sets[f"cell {name} ({harmful}h-{benign}b)"] = [ex for ex in drawn if ex["is_harmful"]]
        sets["sv_val"] = load_role(data.dir, "sv_val")
        sets["sv_fit"] = [ex for ex in load_role(data.dir, "sv_fit") if ex["is_harmful"]]
        model, tokenizer = load_with_vector(base.dir, vector.dir, base.sha256, hw.device, hw.compute_dtype)
        for name, examples in sets.items():
            cov = vector_coverage(model, tokenizer, examples, args.first_k)
            print(json.dumps({"config": cfg.name, "set": name, "vector_sha256": vector.sha256[:12],
                              **{k: round(v, 4) if isinstance(v, float) else v for k, v in cov.items()}}), flush=True)

    measure()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
