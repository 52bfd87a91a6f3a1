"""LoRA adapters (peft) on a frozen encoder: the image-quality recipe (DESIGN.md §3).

FetalCLIP + LoRA: r=8, alpha=16, dropout 0.1 on the MLP's ``c_fc`` and ``c_proj`` and on the
attention's ``out_proj``. The FetalCLIP tower is built with open_clip's own attention (see
:func:`~pipelines.models.encoders.build_fetalclip_visual`), so ``out_proj`` is called as a module
and its adapter takes part in the forward pass and receives gradient.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from pipelines.errors import ModelLoadError


@dataclass(frozen=True, slots=True)
class LoraSettings:
    """Adapter rank, scaling (``alpha / r``), dropout and the module names it wraps."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    targets: tuple[str, ...] = ("c_fc", "c_proj", "out_proj")

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise ModelLoadError(f"LoRA r={self.r}, alpha={self.alpha}: both must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelLoadError(f"LoRA dropout={self.dropout}: must be in [0, 1)")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ModelLoadError(f"LoRA targets {self.targets!r}: need module names")
        object.__setattr__(self, "targets", tuple(self.targets))

    def as_dict(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "targets": list(self.targets),
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> LoraSettings:
        unknown = sorted(set(record) - {"r", "alpha", "dropout", "targets"})
        if unknown:
            raise ModelLoadError(f"LoRA record has unknown fields {unknown}")
        return cls(
            r=int(record["r"]),
            alpha=int(record["alpha"]),
            dropout=float(record["dropout"]),
            targets=tuple(str(t) for t in record["targets"]),
        )


#: The ACOUSLIC-AI image-quality recipe (arXiv 2507.22802).
FETALCLIP_LORA = LoraSettings()


def apply_lora(encoder: nn.Module, settings: LoraSettings) -> nn.Module:
    """Freeze ``encoder`` and wrap its ``settings.targets`` with trainable LoRA adapters, in place.

    Raises
    ------
    ModelLoadError
        A target name matches no ``nn.Linear`` in the encoder (a typo would otherwise silently
        train fewer adapters than the recipe says).
    """
    for param in encoder.parameters():
        param.requires_grad_(False)
    names = [name for name, module in encoder.named_modules() if isinstance(module, nn.Linear)]
    absent = [t for t in settings.targets if not any(n.split(".")[-1] == t for n in names)]
    if absent:
        raise ModelLoadError(
            f"LoRA targets {absent} match no linear layer of {type(encoder).__name__}"
        )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.targets),
        bias="none",
    )
    return inject_adapter_in_model(config, encoder)


def lora_layers(module: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, sub in module.named_modules():
        if isinstance(sub, LoraLayer):
            yield name, sub


def merge_lora(encoder: nn.Module) -> int:
    """Fold every adapter into its base weight and unwrap it; returns how many were merged.

    Inference then runs the plain encoder (no adapter matmuls) with the same function.
    """
    merged = 0
    for name, layer in list(lora_layers(encoder)):
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = encoder.get_submodule(parent_name) if parent_name else encoder
        setattr(parent, child, layer.get_base_layer())
        merged += 1
    return merged
