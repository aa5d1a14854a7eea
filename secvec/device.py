"""Where and in what precision the stages compute: `RuntimeConfig` resolved against the machine.

Training keeps fp32 master weights in every precision: bf16/fp16 run the forward and backward passes under
autocast (Trainer's `bf16`/`fp16`), so the merged security vector (W + dW, dW subtracted at the strip) stays
exact, as in fp32. Evaluation and generation load the weights in the compute dtype (half the memory).
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass

import torch

from secvec.config import RuntimeConfig

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Hardware:
    """A resolved runtime: the device, the precision name, threads and gradient checkpointing."""

    device: str  # cpu | cuda | mps
    precision: str  # fp32 | bf16 | fp16
    threads: int = 1
    gradient_checkpointing: bool = False

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype matmuls run in: the weights' dtype at evaluation, the autocast dtype in training."""
        return DTYPES[self.precision]

    @property
    def mixed(self) -> bool:
        return self.precision != "fp32"

    def describe(self) -> dict[str, object]:
        """What the report and MLflow record of the runtime."""
        return {"device": self.device, "precision": self.precision, "threads": self.threads,
                "gradient_checkpointing": self.gradient_checkpointing, "torch": torch.__version__,
                "device_name": torch.cuda.get_device_name() if self.device == "cuda" else self.device,
                # the CPU and the kernels it ran: the bits depend on them (SECVEC_KERNELS, secvec/__init__.py)
                "cpu": cpu_name(), "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
                "mkl_cbwr": os.environ.get("MKL_CBWR", "")}


def cpu_name() -> str:
    """The CPU's model name, family and model (/proc/cpuinfo on Linux; a VM may show only "AMD EPYC", whose
    generations differ in kernels), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            first_cpu = f.read().split("\n\n")[0]
    except OSError:
        return platform.processor() or platform.machine()
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first_cpu.splitlines())}
    return f"{fields.get('model name', platform.machine())} (family {fields.get('cpu family', '?')} " \
           f"model {fields.get('model', '?')})"


CPU = Hardware("cpu", "fp32")  # what every library function assumes when it is given no hardware


def best_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve(cfg: RuntimeConfig) -> Hardware:
    """The runtime this machine gives `cfg`.

    Raises:
        ValueError: a device that is not there, or a precision it cannot compute in.
    """
    device = best_device() if cfg.device == "auto" else cfg.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device 'cuda': no CUDA device is available (torch.cuda.is_available() is False)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("runtime.device 'mps': no MPS device is available")
    bf16_ok = device == "cpu" or (device == "cuda" and torch.cuda.is_bf16_supported())
    precision = cfg.precision
    if precision == "auto":  # the CPU stays in fp32: it is what every figure so far was measured in
        precision = "bf16" if device == "cuda" and bf16_ok else "fp32"
    if precision == "bf16" and not bf16_ok:
        raise ValueError(f"runtime.precision 'bf16': {device} does not support bfloat16; use fp16 or fp32")
    if precision == "fp16" and device == "cpu":
        raise ValueError("runtime.precision 'fp16': the Trainer has no fp16 autocast on the CPU; use bf16 or fp32")
    return Hardware(device, precision, cfg.threads, cfg.gradient_checkpointing)


def apply_threads(hw: Hardware) -> None:
    """Set torch's CPU threads to the configured number (intra-op; inter-op too where still unset)."""
    torch.set_num_threads(hw.threads)
    try:
        torch.set_num_interop_threads(hw.threads)
    except RuntimeError:  # already set in this process (parallel work has started): intra-op is what matters
        pass
    log.info("runtime: %s, %s, %d torch threads", hw.device, hw.precision, hw.threads)


def pinned(cfg: RuntimeConfig) -> RuntimeConfig:
    """`cfg` with `auto` replaced by what this machine resolves it to: what stages are keyed on, so a cache
    shared by a CPU and a GPU machine never mixes their results."""
    return start(cfg, apply=False)[0]


def start(cfg: RuntimeConfig, apply: bool = True) -> tuple[RuntimeConfig, Hardware]:
    """A run's runtime: the pinned config its stages are keyed on, the resolved hardware, threads applied."""
    hw = resolve(cfg)
    if apply:
        apply_threads(hw)
    return cfg.model_copy(update={"device": hw.device, "precision": hw.precision}), hw
