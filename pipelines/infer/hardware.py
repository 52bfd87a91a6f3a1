"""Where a model runs and whether bf16 pays off there.

bf16 autocast is only a win on hardware that multiplies bf16 natively: CUDA devices with bf16
support, and CPUs with AVX-512 BF16 or AMX. Elsewhere PyTorch emulates bf16 matmuls through fp32
and is *slower* than plain fp32 (measured on the 2-vCPU build machine, whose hypervisor hides
AVX-512 BF16: a bf16 GEMM reaches ~50 GFLOP/s against ~200 fp32; docs/benchmarks.md, Inference).
So ``auto`` asks the hardware, not the CPU model name.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Literal

import torch

logger = logging.getLogger(__name__)

#: ``auto``: bf16 autocast where the hardware multiplies bf16 natively; ``on``/``off``: forced.
BF16Switch = Literal["auto", "on", "off"]

#: /proc/cpuinfo flags of native bf16 matrix arithmetic (Linux names).
_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpuinfo_has_bf16(cpuinfo: str) -> bool:
    """Whether a ``/proc/cpuinfo`` text lists a native bf16 flag (AVX-512 BF16 or AMX-BF16)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and _BF16_CPU_FLAGS & set(value.split()):
            return True
    return False


@functools.cache
def cpu_has_bf16() -> bool:
    """Native bf16 on this CPU, as PyTorch's own CPU detection (what oneDNN dispatches on) sees it.

    Falls back to ``/proc/cpuinfo`` on PyTorch builds without the private probes; a CPU that
    neither reports is treated as lacking bf16 (fail towards fp32, which is always correct).
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    found = [getattr(torch.cpu, name, None) for name in probes]
    if all(callable(probe) for probe in found):
        return any(bool(probe()) for probe in found if callable(probe))
    try:
        return cpuinfo_has_bf16(Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace"))
    except OSError:
        return False


def select_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: the one asked for, else the first CUDA GPU when present, else CPU.

    Raises
    ------
    ValueError
        A CUDA device was asked for on a machine without one (fail closed rather than silently
        running a GPU deployment on CPU).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(chosen)!r} asked for, but CUDA is not available here")
    return chosen


def device_has_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively (so autocast to bf16 is faster than fp32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_has_bf16()
    return False


def resolve_bf16(switch: BF16Switch, device: torch.device) -> bool:
    """Turn the configuration switch into "autocast to bf16 or not" for ``device``.

    Raises
    ------
    ValueError
        ``switch`` is not one of ``auto``, ``on``, ``off``.
    """
    if switch == "off":
        return False
    if switch == "on":
        if not device_has_bf16(device):
            logger.warning(
                "bf16 autocast forced on %s without native bf16: expect it slower than fp32",
                device,
            )
        return True
    if switch == "auto":
        return device_has_bf16(device)
    raise ValueError(f"bf16={switch!r}: expected 'auto', 'on' or 'off'")
