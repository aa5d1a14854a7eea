"""benchmarks/gpu_check.py on CPU at the tiny size: its JSON lines, its equivalence check, its imports.

The script is meant to be copied alone to a GPU machine, so it is run here as a subprocess (as it will be
run there) and, for the cheaper checks, loaded by path (benchmarks/ is a folder of scripts).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
ALLOWED = {"torch", "transformers", "peft", "accelerate"}  # all the GPU machine has besides the stdlib
TINY = ["--device", "cpu", "--size", "tiny", "--rounds", "3", "--steps", "3", "--warmup", "1",
        "--equiv-steps", "4"]
ARMS = ("plain", "guarded_adapter", "guarded_merged")


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module, loaded from its path."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess: on two shared cores, one thread is the faster
    yield module
    torch.set_num_threads(threads)
    sys.modules.pop("gpu_check", None)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One run of the script on CPU, tiny size: (exit status, stdout records, --out records)."""
    out = tmp_path_factory.mktemp("gpu_check") / "lines.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two shared cores: one thread is faster and steadier
    command = [sys.executable, str(SCRIPT), *TINY, "--out", str(out)]
    proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, env=env)
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    return proc, records, [json.loads(line) for line in out.read_text().splitlines()]


def by_kind(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["kind"] == kind]


def test_every_stdout_line_is_one_json_object_and_the_run_succeeds(cli_run):
    proc, records, written = cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["kind"] for r in records] == ["env", "equivalence", "arm", "arm", "arm", "ratios", "done"]
    assert written == records  # --out holds the same lines


def test_environment_line_comes_first(cli_run):
    env = cli_run[1][0]
    assert env["kind"] == "env"
    assert env["torch"] == torch.__version__ and env["transformers"] and env["peft"]
    assert env["device"] == "cpu" and env["device_name"] and env["dtype"] == "fp32"
    assert env["config"] == {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 172,
                             "vocab": 256, "seq": 32, "batch": 2}
    assert env["params"] > env["matmul_params"] > 0
    assert env["vector"]["rank"] == 8 and env["vector"]["layers"] == 2 * 7 and env["vector"]["params"] > 0


def test_three_arms_with_throughput_and_null_mfu_and_memory_on_cpu(cli_run):
    arms = {r["arm"]: r for r in by_kind(cli_run[1], "arm")}
    assert tuple(arms) == ARMS
    for record in arms.values():
        tps = record["tokens_per_s"]
        assert 0 < tps["min"] <= tps["median"] <= tps["max"]
        assert len(record["rounds_tokens_per_s"]) == 3
        assert record["mfu"] is None and "CPU" in record["mfu_reason"]
        assert record["peak_memory_bytes"] is None and record["memory_reason"]
        assert record["achieved_tflops"] >= 0 and record["tokens_per_step"] == 2 * 32
    # The same backbone trains in every arm; only the adapter arm holds the frozen vector.
    assert len({r["trainable_params"] for r in arms.values()}) == 1
    assert arms["guarded_adapter"]["frozen_params"] == cli_run[1][0]["vector"]["params"]
    assert arms["plain"]["frozen_params"] == arms["guarded_merged"]["frozen_params"] == 0


def test_ratios_are_paired_medians_with_their_range(cli_run):
    records = cli_run[1]
    (ratios,) = by_kind(records, "ratios")
    assert ratios["rounds"] == 3 and ratios["truncated"] is False
    arms = {r["arm"]: r["rounds_tokens_per_s"] for r in by_kind(records, "arm")}
    for name in ARMS[1:]:
        ratio = ratios["tokens_per_s"][f"{name}_over_plain"]
        per_round = sorted(a / p for a, p in zip(arms[name], arms["plain"], strict=True))
        assert ratio["median"] == pytest.approx(per_round[1], rel=1e-2)  # rounded tokens/s in the lines
        assert ratio["min"] <= ratio["median"] <= ratio["max"]
        assert ratios["peak_memory"][f"{name}_over_plain"] is None


def test_equivalence_passes_with_its_control_detected(cli_run):
    (check,) = by_kind(cli_run[1], "equivalence")
    assert check["passed"] is True and check["tolerance_relative"] == 1e-5
    assert check["vector_unchanged_by_training"] is True
    assert check["params"]["relative"] <= 1e-5 and check["logits"]["relative"] <= 1e-5
    assert check["training_moved_weights"]["relative"] > 1e-3  # training did move the weights
    assert check["control_vector_left_in"]["detected"] is True
    assert cli_run[1][-1]["equivalence_passed"] is True


def tiny_setup(gpu_check, steps: int = 3):
    size = gpu_check.SIZES["tiny"]
    device = torch.device("cpu")
    template = gpu_check.build_backbone(gpu_check.llama_config(size), device, seed=0)
    vector = gpu_check.make_vector(template, seed=0)
    batches = gpu_check.make_batches(steps + 1, size, seed=10, device=device)
    return template, vector, batches, device


@pytest.mark.parametrize("strip_scale", [0.5, 0.0])
def test_a_wrong_strip_fails_the_equivalence_check(gpu_check, strip_scale):
    template, vector, batches, device = tiny_setup(gpu_check)
    check = gpu_check.equivalence(template, vector, batches[:-1], batches[-1], device, "sgd", 0.05, 1e-5, 0,
                                  strip_scale=strip_scale)
    assert check["passed"] is False
    assert check["params"]["relative"] > 1e-2 and check["logits"]["relative"] > 1e-5


def test_the_right_strip_passes_with_adamw_too_in_fp32(gpu_check):
    template, vector, batches, device = tiny_setup(gpu_check)
    # AdamW steps every weight by ~lr whatever its gradient's size, so rounding noise in tiny gradients moves
    # weights as much as signal: the merged/adapter gap reached 1.2e-5 relative on one CPU, under 1e-5 on
    # another. 1e-4 still sits 100x under a wrong strip (> 1e-2, test above) and 1e4x under the control.
    check = gpu_check.equivalence(template, vector, batches[:-1], batches[-1], device, "adamw", 1e-4, 1e-4, 0)
    assert check["passed"] is True, check
    assert check["control_vector_left_in"]["relative"] > 1e-1


def test_budget_cuts_rounds_short_and_says_so(gpu_check, capsys):
    status = gpu_check.main([*TINY, "--max-seconds", "0"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    (ratios,) = by_kind(records, "ratios")
    assert status == 0
    assert ratios["rounds"] == 1 and ratios["truncated"] is True
    assert "--max-seconds" in ratios["truncation_reason"]
    assert records[-1]["truncated"] is True


def test_out_of_memory_is_a_json_error_line_and_exit_status_2(gpu_check, capsys, monkeypatch):
    def oom(args, emit):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(gpu_check, "run", oom)
    assert gpu_check.main(TINY) == 2
    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert record["kind"] == "error" and record["error"] == "out_of_memory" and record["hint"]


def test_peak_table_prefers_the_longest_matching_name(gpu_check):
    cuda = torch.device("cuda")
    assert gpu_check.device_peak(cuda, "NVIDIA H100 PCIe", None)[0] == 756e12
    assert gpu_check.device_peak(cuda, "NVIDIA H100 80GB HBM3", None)[0] == 989e12
    assert gpu_check.device_peak(cuda, "NVIDIA A100-SXM4-80GB", None)[0] == 312e12
    assert gpu_check.device_peak(cuda, "NVIDIA A10", None)[0] == 125e12
    assert gpu_check.device_peak(cuda, "NVIDIA H200", None)[0] == 989e12
    assert gpu_check.device_peak(cuda, "Mystery GPU", None)[0] is None
    assert gpu_check.device_peak(cuda, "Mystery GPU", 100.0) == (100e12, "--peak-tflops")
    assert gpu_check.device_peak(torch.device("cpu"), "Xeon", None)[0] is None


def top_level_modules(path: Path) -> set[str]:
    """First component of every module the file imports (absolute imports; a relative one counts as '.')."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    return names


def test_script_imports_only_the_stdlib_torch_transformers_peft_accelerate():
    imported = top_level_modules(SCRIPT)
    outside = {name for name in imported if name not in sys.stdlib_module_names and name not in ALLOWED}
    assert not outside, f"gpu_check.py must run alone on the GPU machine; it imports {sorted(outside)}"
    assert {"torch", "transformers", "peft"} <= imported
    source = SCRIPT.read_text()
    assert "importlib.import_module" not in source and "__import__" not in source  # no hidden imports
