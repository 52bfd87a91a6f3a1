"""Where a model runs: CUDA when present and asked for, bf16 where the hardware has it.

DESIGN.md §7: this project's CPUs have AVX-512 BF16 (bf16 autocast ≈ 3× fp32 for ViT-B/16);
H100/H200 GPUs are lent only sometimes, so every path also runs on a CPU.
"""

from __future__ import annotations

from typing import Literal

import torch

from pipelines.errors import ModelLoadError

DeviceSetting = Literal["auto", "cpu", "cuda"]


def resolve_device(setting: str) -> torch.device:
    """``auto``: CUDA if available, else CPU; ``cuda`` without a GPU is an error, not a fallback."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("models.device is 'cuda' but torch sees no CUDA device")
        return torch.device("cuda")
    raise ModelLoadError(f"device {setting!r}: expected 'auto', 'cpu' or 'cuda'")


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (CUDA compute ≥ 8.0; CPU with AVX-512 BF16 or AMX)."""
    # One detector for the whole code base (pipelines/infer/hardware.py): oneDNN's own probe
    # also says yes on AVX-512 CPUs that only emulate bf16, where autocast is slower than fp32.
    from pipelines.infer.hardware import device_has_bf16

    return device_has_bf16(device)


def resolve_bf16(setting: bool | str, device: torch.device) -> bool:
    """``"auto"``: bf16 where :func:`bf16_supported`; ``True`` insists (error if unsupported)."""
    if setting == "auto":
        return bf16_supported(device)
    if setting is True:
        if not bf16_supported(device):
            raise ModelLoadError(f"models.bf16 is true but {device} has no native bf16")
        return True
    if setting is False:
        return False
    raise ModelLoadError(f"bf16 {setting!r}: expected 'auto', true or false")
