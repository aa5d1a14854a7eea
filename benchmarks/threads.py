"""What torch's thread count changes: the micro base bootstrapped twice at each thread count, in fresh processes.

usage: [SECVEC_KERNELS=portable] python benchmarks/threads.py [--threads 1 2] [--size micro]

Prints one JSON line per run (threads, CPU kernels, sha256 of the saved base, final training loss) and a summary line:
whether runs at one thread count are bit-identical, and whether different thread counts agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, torch
from pathlib import Path
from secvec.bootstrap import bootstrap_base
from secvec.config import BootstrapConfig, load_data_config
from secvec.data import TRAIN_ROLES, load_role
from secvec.data.build import build_dataset
from secvec.device import CPU, Hardware, apply_threads
from secvec.models import hash_model_dir
from secvec.paths import PROJECT_ROOT

threads, size, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
apply_threads(Hardware("cpu", "fp32", threads))
build_dataset(load_data_config(PROJECT_ROOT / "configs" / "data" / "micro.yaml"), out / "data")
vocab = [m["content"] for r in TRAIN_ROLES for ex in load_role(out / "data", r) for m in ex["messages"]]
cfg = BootstrapConfig(size=size, train={"learning_rate": 3e-3, "epochs": 3, "batch_size": 32, "progress_bar": False})
history = bootstrap_base(load_role(out / "data", "align"), cfg, out / "base", vocab)
kernels = {k: v for k, v in CPU.describe().items() if k in ("cpu_kernels", "mkl_cbwr")}
print(json.dumps({"threads": threads, **kernels, "sha256": hash_model_dir(out / "base"),
                  "final_loss": next(r["train_loss"] for r in reversed(history) if "train_loss" in r)}))
"""


def run(threads: int, size: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="secvec-threads-") as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, str(threads), size, tmp], capture_output=True, text=True,
                             check=True, env={"OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin",
                                              "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                              "SECVEC_KERNELS": os.environ.get("SECVEC_KERNELS", "native")})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--size", default="micro", choices=["micro", "tiny"])
    args = parser.parse_args(argv)
    runs = {t: [run(t, args.size), run(t, args.size)] for t in args.threads}
    for records in runs.values():
        for record in records:
            print(json.dumps(record), flush=True)
    same = {t: len({r["sha256"] for r in records}) == 1 for t, records in runs.items()}
    across = len({records[0]["sha256"] for records in runs.values()}) == 1
    print(json.dumps({"summary": "threads", "size": args.size, "bit_identical_at_each_count": same,
                      "same_bits_across_counts": across,
                      "final_loss_spread": max(r["final_loss"] for rs in runs.values() for r in rs)
                      - min(r["final_loss"] for rs in runs.values() for r in rs)}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
