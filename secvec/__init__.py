"""secvec: fine-tune safety-aligned LLMs on possibly harmful data without learning the harm.

Security vectors (Zhou et al. 2023, arXiv 2311.02105): fit a LoRA "security vector" on harmful samples,
fine-tune the backbone with the vector active and frozen, then strip the vector.
"""

import os
import platform

__version__ = "0.1.0"


def _pin_cpu_kernels() -> None:
    """Run torch's and MKL's CPU kernels on their AVX2 code paths on every x86 machine with AVX2.

    The same config and threads gave other bits on another machine of one kind: its CPU took other kernels (the
    micro base hashes differently under ATEN_CPU_CAPABILITY=default or MKL_CBWR=COMPATIBLE than under AVX2, at
    the same final loss to 1e-7; docs/RELIABILITY.md). Both are read once, when torch and MKL start, hence here,
    before anything imports torch. `setdefault`: a user may choose others (e.g. `ATEN_CPU_CAPABILITY=avx512` for
    speed) and the report records what ran (`runtime.cpu_kernels`).
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return
    try:
        with open("/proc/cpuinfo") as f:
            has_avx2 = " avx2" in f.read()
    except OSError:
        return
    if has_avx2:  # forcing a code path the CPU lacks would crash on an illegal instruction
        os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
        os.environ.setdefault("MKL_CBWR", "AVX2")


_pin_cpu_kernels()
