"""Task heads: encoder features to the task's logits (DESIGN.md §3, one recipe per task)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from pipelines.errors import ModelLoadError

HeadKind = Literal["linear", "mlp"]


@dataclass(frozen=True, slots=True)
class HeadSpec:
    """How features become logits.

    ``linear``: one dense layer (ventriculomegaly's "dense → 2", image quality's
    ``Linear(768, 1)``). ``mlp``: dense → GELU → dropout → dense, the heart-view paper's MLP head;
    ``hidden`` and ``dropout`` apply to it only.
    """

    kind: HeadKind = "linear"
    hidden: int = 512
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ModelLoadError(f"head kind {self.kind!r}: expected 'linear' or 'mlp'")
        if self.hidden < 1:
            raise ModelLoadError(f"head hidden={self.hidden}: must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelLoadError(f"head dropout={self.dropout}: must be in [0, 1)")

    def build(self, in_features: int, num_outputs: int) -> nn.Module:
        if self.kind == "linear":
            return nn.Linear(in_features, num_outputs)
        return nn.Sequential(
            nn.Linear(in_features, self.hidden),
            nn.GELU(),
            nn.Dropout(self.dropout),
            nn.Linear(self.hidden, num_outputs),
        )

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "hidden": self.hidden, "dropout": self.dropout}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> HeadSpec:
        unknown = sorted(set(record) - {"kind", "hidden", "dropout"})
        if unknown:
            raise ModelLoadError(f"head record has unknown fields {unknown}")
        return cls(
            kind=record.get("kind", "linear"),
            hidden=int(record.get("hidden", 512)),
            dropout=float(record.get("dropout", 0.0)),
        )


#: The papers' heads per built-in task; tasks added by configuration get a linear head.
DEFAULT_HEADS: Mapping[str, HeadSpec] = {
    "heart_view": HeadSpec("mlp", hidden=512, dropout=0.1),
    "ventriculomegaly": HeadSpec("linear"),
    "image_quality": HeadSpec("linear"),
}


def default_head(task_name: str) -> HeadSpec:
    return DEFAULT_HEADS.get(task_name, HeadSpec("linear"))
