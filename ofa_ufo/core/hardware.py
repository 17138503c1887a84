"""What the machine is fast at: bf16 on a CUDA GPU or on a CPU with AMX / AVX512-BF16, else fp32.

The CPUs this project runs on differ from day to day: on an AVX2-only CPU bf16 matmuls are about
150x slower than fp32, on a Xeon with AMX about 5x faster. So the precision is detected at run
time, never assumed:

    support = precision_support("cpu")
    print(support.summary)        # "CPU: ... ; bf16 fast (amx_bf16, avx512_bf16)" or "... fp32 only"
    dtype = support.dtype         # torch.bfloat16 or torch.float32
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ofa_ufo.core.timing import cpu_name

__all__ = ["BF16_CPU_FLAGS", "PrecisionSupport", "cpu_flags", "precision_support"]

# CPU feature flags (Linux /proc/cpuinfo names) with native bf16 matmul instructions
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not readable, e.g. outside Linux)."""
    try:
        for line in Path(cpuinfo).read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@dataclass(frozen=True)
class PrecisionSupport:
    """Whether bf16 is fast on `device`, and why (the ISA flags or the GPU that decided it)."""

    device: str
    bf16_fast: bool
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype to use: bf16 where it is fast, fp32 elsewhere."""
        return torch.bfloat16 if self.bf16_fast else torch.float32

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16_fast else "fp32"

    @property
    def summary(self) -> str:
        """One line for the top of a run's log and for a saved result."""
        return f"{self.device}; {self.precision} ({self.reason})"


def precision_support(device: torch.device | str = "cpu", cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> PrecisionSupport:
    """Detect whether bf16 compute is fast on `device` (a CUDA GPU with bf16, or a CPU with one of
    `BF16_CPU_FLAGS`); fp32 everywhere else."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        fast = torch.cuda.is_bf16_supported()
        return PrecisionSupport(f"GPU: {name}", fast, "CUDA bf16" if fast else "GPU without bf16")
    if device.type != "cpu":
        return PrecisionSupport(str(device), False, f"no bf16 detection for device type {device.type!r}")
    found = sorted(set(BF16_CPU_FLAGS) & cpu_flags(cpuinfo))
    reason = ", ".join(found) if found else "no amx_bf16 / avx512_bf16: bf16 would be emulated and slow"
    return PrecisionSupport(f"CPU: {cpu_name(cpuinfo)}", bool(found), reason)
