"""Run every performance benchmark: one JSON object per line on stdout and in benchmarks/results.jsonl.

usage: python benchmarks/run.py [--only NAME ...] [--threads N] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make the `benchmarks` package importable

for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
                   "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(key, value)

NAMES = ("generation_speedup", "guarded_vs_plain_throughput", "train_mfu", "vs_reference_trainer", "scaling",
         "peak_rss_ratio", "pipeline_overhead")


def run(name: str, done: dict[str, list[dict]]) -> list[dict]:
    """Records of one benchmark (train_mfu reuses the throughput runs measured just before it)."""
    from benchmarks import generation, memory, pipeline, reference, training

    if name == "train_mfu":
        throughput = done.get("guarded_vs_plain_throughput") or training.guarded_vs_plain_throughput()
        return training.train_mfu(throughput)
    table = {"generation_speedup": generation.generation_speedup,
             "guarded_vs_plain_throughput": training.guarded_vs_plain_throughput,
             "vs_reference_trainer": reference.vs_reference_trainer, "scaling": training.scaling,
             "peak_rss_ratio": memory.peak_rss_ratio, "pipeline_overhead": pipeline.pipeline_overhead}
    return table[name]()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=NAMES, help="run these benchmarks only")
    # One thread by default: on 2 shared cores, a second thread stalls at every OpenMP barrier while the
    # other core is busy (tiny model, loaded machine: 190 tokens/s with 2 threads vs 670 with 1).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (also for child processes)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results.jsonl")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from benchmarks.common import machine, to_line

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    args.out.write_text("")
    done: dict[str, list[dict]] = {}
    failed = []
    for name in args.only or NAMES:
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its metrics; stdout is JSON only
                done[name] = run(name, done)
        except Exception:  # noqa: BLE001  one broken benchmark must not hide the other figures
            traceback.print_exc()
            failed.append(name)
            continue
        for record in done[name]:
            line = to_line({**record, "seconds": round(time.perf_counter() - start, 1), "machine": machine()})
            print(line, flush=True)
            with args.out.open("a") as out:
                out.write(line + "\n")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
