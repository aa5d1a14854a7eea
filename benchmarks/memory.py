"""Peak RSS of guarded vs plain fine-tuning, each arm in a fresh process (Linux VmHWM).

usage (one arm; prints a JSON line): python -m benchmarks.memory ARM SIZE STEPS
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import LARGE

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("plain", "merged", "adapter")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def _reset_peak() -> None:
    # Start-up (tokenizer training, imports) peaks above a tiny model's training; "5" sets VmHWM to VmRSS.
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def measure_arm(arm: str, size: str, steps: int) -> dict:
    """Fine-tune once in this process; peak RSS once the model is ready and after training."""
    from benchmarks.common import build_model, with_vector, workload
    from benchmarks.training import timed_finetune

    tokenizer = workload().tokenizer
    model = build_model(tokenizer, size)
    model = model if arm == "plain" else with_vector(model)
    _reset_peak()
    ready = _status_mib("VmRSS")
    timed_finetune(model, workload().examples(steps * 32), steps, vector_mode="adapter" if arm == "adapter"
                   else "merged")
    return {"arm": arm, "ready_mib": round(ready, 1), "peak_mib": round(_status_mib("VmHWM"), 1)}


def run_arm(arm: str, size: str, steps: int) -> dict:
    """`measure_arm` in a fresh interpreter, so no arm inherits another's peak."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", arm, size, str(steps)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory arm {arm} ({size}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_ratio(sizes: Sequence[str] = ("tiny", LARGE), steps: int = 3) -> list[dict]:
    """Peak RSS of guarded (merged) over plain fine-tuning; the first size gives the value.

    The peak includes the interpreter and libraries; `growth_ratio` compares only what fine-tuning adds
    (gradients, optimiser state, activations and, in merged mode, the vector's dW per target weight).
    """
    from benchmarks.common import result

    per_size = {}
    for size in sizes:
        arms = {arm: run_arm(arm, size, steps) for arm in ARMS}
        growth = {arm: round(arms[arm]["peak_mib"] - arms[arm]["ready_mib"], 1) for arm in ARMS}
        per_size[size] = {"peak_mib": {a: arms[a]["peak_mib"] for a in ARMS},
                          "ready_mib": {a: arms[a]["ready_mib"] for a in ARMS},
                          "ratio": round(arms["merged"]["peak_mib"] / arms["plain"]["peak_mib"], 4),
                          "adapter_ratio": round(arms["adapter"]["peak_mib"] / arms["plain"]["peak_mib"], 4),
                          "growth_mib": growth,
                          "growth_ratio": round(growth["merged"] / growth["plain"], 4) if growth["plain"] > 0 else None,
                          "adapter_growth_ratio": round(growth["adapter"] / growth["plain"], 4)
                          if growth["plain"] > 0 else None}
    value = per_size[sizes[0]]["ratio"]
    return [result("peak_rss_ratio", value, "ratio of peak RSS (guarded merged / plain)", target="<= 1.05",
                   passed=value <= 1.05, model=sizes[0], steps=steps, sizes=per_size,
                   method="VmHWM of /proc/self/status, reset once the model is ready; one subprocess per arm")]


if __name__ == "__main__":
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    print(json.dumps(measure_arm(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
