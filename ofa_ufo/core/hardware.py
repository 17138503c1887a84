"""What the machine is fast at: bf16 on a CUDA GPU or on a CPU with AMX / AVX512-BF16, else fp32.

The CPUs this project runs on differ from day to day: on an AVX2-only CPU bf16 matmuls are about
150x slower than fp32, on a Xeon with AMX about 5x faster. So the precision is detected at run
time, never assumed:

    support = precision_support("cpu")
    print(support.summary)        # "CPU: ... ; bf16 fast (amx_bf16, avx512_bf16)" or "... fp32 only"
    dtype = support.dtype         # torch.bfloat16 or torch.float32
    choice = resolve_precision("auto", "cpu")   # what `precision: auto|fp32|bf16` means on this machine
    print(choice.summary)         # "precision auto -> fp32 (CPU: ...; fp32 (no amx_bf16 / ...))"

`OFA_UFO_CPUINFO=FILE` makes the CPU detection read FILE instead of /proc/cpuinfo, so that a test (or
a run on a machine that is not the target) can force either answer without that hardware.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ofa_ufo.core.timing import cpu_name

__all__ = ["BF16_CPU_FLAGS", "CPUINFO_ENV", "PRECISIONS", "PrecisionChoice", "PrecisionSupport", "cpu_flags",
           "cpuinfo_path", "precision_support", "resolve_precision"]

# CPU feature flags (Linux /proc/cpuinfo names) with native bf16 matmul instructions
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# the environment variable naming a cpuinfo file to read instead of /proc/cpuinfo
CPUINFO_ENV = "OFA_UFO_CPUINFO"
# what a `precision` option may ask for: auto (bf16 where it is fast, else fp32), fp32, bf16
PRECISIONS = ("auto", "fp32", "bf16")


def cpuinfo_path() -> str:
    """The cpuinfo file the detection reads: $OFA_UFO_CPUINFO when set (it must exist), else /proc/cpuinfo."""
    override = os.environ.get(CPUINFO_ENV)
    if not override:
        return "/proc/cpuinfo"
    if not Path(override).is_file():
        raise FileNotFoundError(f"{CPUINFO_ENV}={override!r} names no file; point it to a cpuinfo text file "
                                "(lines 'model name : ...' and 'flags : ...') or unset it")
    return override


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


def precision_support(device: torch.device | str = "cpu",
                      cpuinfo: str | os.PathLike | None = None) -> PrecisionSupport:
    """Detect whether bf16 compute is fast on `device` (a CUDA GPU with bf16, or a CPU with one of
    `BF16_CPU_FLAGS`); fp32 everywhere else. `cpuinfo` defaults to `cpuinfo_path()`."""
    device = torch.device(device)
    cpuinfo = cpuinfo_path() if cpuinfo is None else cpuinfo
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        fast = torch.cuda.is_bf16_supported()
        return PrecisionSupport(f"GPU: {name}", fast, "CUDA bf16" if fast else "GPU without bf16")
    if device.type != "cpu":
        return PrecisionSupport(str(device), False, f"no bf16 detection for device type {device.type!r}")
    found = sorted(set(BF16_CPU_FLAGS) & cpu_flags(cpuinfo))
    reason = ", ".join(found) if found else "no amx_bf16 / avx512_bf16: bf16 would be emulated and slow"
    return PrecisionSupport(f"CPU: {cpu_name(cpuinfo)}", bool(found), reason)


@dataclass(frozen=True)
class PrecisionChoice:
    """What a `precision` option (auto | fp32 | bf16) resolved to on a device, and why."""

    requested: str
    precision: str
    support: PrecisionSupport

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def summary(self) -> str:
        """One line for the top of a run's log: the request, the answer and the hardware that decided it."""
        note = "" if self.requested != "bf16" or self.support.bf16_fast else " (asked for; emulated here, slow)"
        return f"precision {self.requested} -> {self.precision}{note} ({self.support.summary})"

    def record(self) -> dict[str, str]:
        """JSON-ready, saved with a run's metrics."""
        return {"requested": self.requested, "used": self.precision, "summary": self.summary}


def resolve_precision(requested: str, device: torch.device | str = "cpu",
                      cpuinfo: str | os.PathLike | None = None) -> PrecisionChoice:
    """`auto` -> bf16 where `precision_support(device)` says it is fast, fp32 elsewhere; `fp32` and `bf16`
    are taken as asked (bf16 runs everywhere, only slowly without native support)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    support = precision_support(device, cpuinfo)
    used = support.precision if requested == "auto" else requested
    return PrecisionChoice(requested, used, support)
