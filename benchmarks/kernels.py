"""What portable CPU kernels cost: a training step of the tiny default under each SECVEC_KERNELS, in fresh processes.

usage: python benchmarks/kernels.py [--threads 1 2] [--repeats 3]

The kernels are chosen when torch starts, so each (kernels, threads) runs in its own process, and the runs alternate
so that a busy spell of the machine hits every setting alike. Prints one JSON line per setting (the kernels that ran,
the median seconds per step of the tiny Llama, AdamW, batch 16 x 96 tokens) and a summary of portable / native.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, sys, time, torch
from benchmarks.common import build_model, workload
from secvec.device import CPU

torch.set_num_threads(int(sys.argv[1]))
tokenizer = workload().tokenizer
model = build_model(tokenizer, "tiny")
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
batch = torch.randint(0, len(tokenizer), (16, 96))

def step():
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()

for _ in range(3):  # warm-up: allocator, kernel caches
    step()
start = time.perf_counter()
for _ in range(10):
    step()
described = CPU.describe()
print(json.dumps({**{k: described[k] for k in ("cpu", "cpu_kernels", "mkl_cbwr")},
                  "s_per_step": (time.perf_counter() - start) / 10}))
"""


def step_time(kernels: str, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads)], capture_output=True, text=True, check=True,
                         env={**env, "SECVEC_KERNELS": kernels, "OMP_NUM_THREADS": str(threads)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    settings = [(kernels, t) for t in args.threads for kernels in ("native", "portable")]
    runs: dict[tuple[str, int], list[dict]] = {s: [] for s in settings}
    for _ in range(args.repeats):
        for kernels, threads in settings:
            runs[kernels, threads].append(step_time(kernels, threads))
    median = {s: statistics.median(r["s_per_step"] for r in records) for s, records in runs.items()}
    for (kernels, threads), records in runs.items():
        print(json.dumps({"kernels": kernels, "threads": threads, **{k: records[0][k] for k in records[0]
                          if k != "s_per_step"}, "s_per_step_median": round(median[kernels, threads], 4),
                          "s_per_step": [round(r["s_per_step"], 4) for r in records]}), flush=True)
    print(json.dumps({"summary": "kernels", "portable_over_native": {
        t: round(median["portable", t] / median["native", t], 2) for t in args.threads}}))


if __name__ == "__main__":
    main()
