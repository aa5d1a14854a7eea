"""Runtime resolution (device, precision, threads) and training under it on the CPU."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from secvec.config import RuntimeConfig
from secvec.device import Hardware, pinned, resolve


def test_auto_on_a_cpu_machine_is_the_cpu_in_fp32_and_pinning_records_it():
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("an accelerator is present")
    assert resolve(RuntimeConfig()) == Hardware("cpu", "fp32", 1, False)
    assert pinned(RuntimeConfig(threads=2)) == RuntimeConfig(device="cpu", precision="fp32", threads=2)
    assert resolve(RuntimeConfig(precision="bf16")).compute_dtype == torch.bfloat16


def test_impossible_runtimes_fail_with_the_field_named():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="runtime.device 'cuda'"):
            resolve(RuntimeConfig(device="cuda"))
    with pytest.raises(ValueError, match="runtime.precision 'fp16'"):
        resolve(RuntimeConfig(device="cpu", precision="fp16"))


def test_gradient_checkpointing_still_trains_a_vector_over_a_frozen_backbone(micro_base, world, tmp_path):
    """Non-reentrant checkpointing: the LoRA gets gradients although no backbone input needs them."""
    from secvec.config import TrainConfig, VectorConfig
    from secvec.models import load_causal_lm
    from secvec.vector import fit_vector

    model, tokenizer = load_causal_lm(micro_base)
    cfg = VectorConfig(kl_weight=0.0, train=TrainConfig(learning_rate=1e-2, max_steps=3, batch_size=8,
                                                        progress_bar=False, logging_steps=1))
    vector, meta = fit_vector(model, tokenizer, world["sv_fit"], [], cfg, tmp_path / "v",
                              hardware=Hardware("cpu", "fp32", 1, gradient_checkpointing=True))
    assert any(p.abs().sum() > 0 for n, p in vector.named_parameters() if "lora_B" in n)  # B starts at zero
    losses = [r["loss"] for r in meta["history"] if "loss" in r]
    assert losses and losses[-1] < losses[0] + 1e-6


def _kernels_in_a_fresh_process(env: dict[str, str]) -> dict:
    code = "import json, secvec; from secvec.device import CPU; print(json.dumps(CPU.describe()))"
    base = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "SECVEC_KERNELS")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_portable_kernels_are_pinned_before_torch_starts_and_every_run_records_its_kernels():
    """Intel and AMD CPUs of one machine kind took other kernels and gave other bits; SECVEC_KERNELS=portable
    pins torch's and MKL's code paths (unless the user chose one) and the runtime record says which ran."""
    if platform.machine() != "x86_64" or " avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("the portable path is pinned on x86 CPUs with AVX2")
    native = _kernels_in_a_fresh_process({})
    assert native["mkl_cbwr"] == "" and native["cpu_kernels"] in ("AVX2", "AVX512")
    assert "family" in native["cpu"]
    portable = _kernels_in_a_fresh_process({"SECVEC_KERNELS": "portable"})
    assert (portable["cpu_kernels"], portable["mkl_cbwr"]) == ("AVX2", "COMPATIBLE")
    chosen = _kernels_in_a_fresh_process({"SECVEC_KERNELS": "portable", "ATEN_CPU_CAPABILITY": "default"})
    assert (chosen["cpu_kernels"], chosen["mkl_cbwr"]) == ("DEFAULT", "COMPATIBLE")
    bad = subprocess.run([sys.executable, "-c", "import secvec"], env={**os.environ, "SECVEC_KERNELS": "fast"},
                         capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "SECVEC_KERNELS='fast'" in bad.stderr
