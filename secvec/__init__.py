"""secvec: fine-tune safety-aligned LLMs on possibly harmful data without learning the harm.

Security vectors (Zhou et al. 2023, arXiv 2311.02105): fit a LoRA "security vector" on harmful samples,
fine-tune the backbone with the vector active and frozen, then strip the vector.
"""

import os
import platform

__version__ = "0.1.0"


def _pin_cpu_kernels() -> None:
    """With `SECVEC_KERNELS=portable`, run torch's and MKL's CPU kernels on code paths on which an Intel and an
    AMD CPU computed the same bits.

    By default each CPU takes its fastest kernels, and the bits (base, vector, report) are those of its CPU
    model and thread count: an Intel Xeon with AVX-512 and an AMD EPYC with AVX2 bootstrapped other micro bases
    at one config and thread count. `ATEN_CPU_CAPABILITY=avx2` with MKL's conditional numerical reproducibility
    `MKL_CBWR=COMPATIBLE` gave both CPUs one micro base, at 1 and at 2 threads; `MKL_CBWR=AVX2` did not
    (docs/RELIABILITY.md). It costs 3.2-3.9x the training time (benchmarks/kernels.py), hence opt-in. Both are
    read once, when torch and MKL start, hence here, before anything imports torch; a user's own
    ATEN_CPU_CAPABILITY or MKL_CBWR wins, and the report records what ran (`runtime.cpu_kernels`, `mkl_cbwr`).
    """
    choice = os.environ.get("SECVEC_KERNELS", "native")
    if choice not in ("native", "portable"):
        raise ValueError(f"SECVEC_KERNELS={choice!r}: expected 'native' or 'portable'")
    if choice == "native" or platform.machine().lower() not in ("x86_64", "amd64"):
        return
    try:
        with open("/proc/cpuinfo") as f:
            has_avx2 = " avx2" in f.read()
    except OSError:
        has_avx2 = False
    # forcing a code path the CPU lacks would crash on an illegal instruction
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2" if has_avx2 else "default")
    os.environ.setdefault("MKL_CBWR", "COMPATIBLE")


_pin_cpu_kernels()
