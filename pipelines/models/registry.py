"""The encoder registry: an encoder is made by name and carries a card (timm's shape, STYLE.md).

A card ties an architecture to what using it needs: the feature size its head receives, the input
size and preprocessing spec it was trained with, where its patch tokens are and which layer
Eigen-CAM reads (DESIGN.md §3, "Explanations"), and the ``checkpoint_filter_fn`` that maps the
published checkpoint's layout onto its keys. :func:`create_encoder` never returns random weights
when a checkpoint was asked for: a file that does not fit raises :class:`ModelLoadError`.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import nn

from pipelines.errors import ModelLoadError
from pipelines.models.checkpoints import (
    FilterFn,
    has_unsaved_buffers,
    load_state_strict,
    read_checkpoint,
)

#: ``"tokens"``: the target layer outputs (batch, prefix + rows·cols, channels) ViT tokens;
#: ``"feature_map"``: a CNN's (batch, channels, height, width).
Layout = Literal["tokens", "feature_map"]

_ACCESSOR_PART = re.compile(r"^(?P<attr>[A-Za-z_][A-Za-z0-9_]*)(?P<index>(\[-?\d+\])*)$")


@dataclass(frozen=True, slots=True)
class EncoderCard:
    """What an encoder is and how to use it; ``create_encoder(card.name)`` builds it.

    Attributes
    ----------
    name
        Registry key, recorded in every usfmd model file and model version.
    architecture
        The upstream architecture it reproduces, for people (e.g. ``timm vit_base_patch16_224``).
    builder
        Builds the architecture with random weights from keyword ``overrides``.
    checkpoint_filter_fn
        Maps a loaded published checkpoint (any wrapper) to this encoder's state_dict keys.
    embed_dim
        Size of the feature vector the encoder returns, i.e. the head's input.
    input_size
        Side of the square input image.
    preprocessing
        Name of the :class:`~pipelines.preprocess.PreprocessSpec` the weights were trained with.
    target_layer
        Attribute path of the Eigen-CAM layer, e.g. ``blocks[-1].norm1``; see
        :meth:`get_target_layer`.
    layout
        Shape of that layer's output (:data:`Layout`).
    patch_size
        ViT patch side in pixels; None for CNNs.
    num_prefix_tokens
        Tokens before the patch tokens in the target layer's output (1: the CLS token).
    overridable
        Constructor arguments :func:`create_encoder` accepts as overrides.
    tiny_overrides
        Overrides that build a narrow, shallow variant of the same architecture (tests, smoke runs).
    weights
        Where the published weights come from (file name and layout), for people.
    """

    name: str
    architecture: str
    builder: Callable[..., nn.Module]
    checkpoint_filter_fn: FilterFn
    embed_dim: int
    input_size: int
    preprocessing: str
    target_layer: str
    layout: Layout
    patch_size: int | None = None
    num_prefix_tokens: int = 0
    overridable: frozenset[str] = frozenset()
    tiny_overrides: Mapping[str, Any] = field(default_factory=dict)
    weights: str = ""
    #: Reads embed_dim / input_size / patch_size / num_prefix_tokens from a built encoder.
    inspect: Callable[[nn.Module], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an encoder card needs a name")
        if self.layout == "tokens" and not self.patch_size:
            raise ValueError(f"encoder {self.name!r}: a token layout needs patch_size")
        for part in self.target_layer.split("."):
            if not _ACCESSOR_PART.match(part):
                raise ValueError(
                    f"encoder {self.name!r}: target_layer {self.target_layer!r} is not an "
                    "attribute path like 'blocks[-1].norm1'"
                )
        object.__setattr__(self, "tiny_overrides", MappingProxyType(dict(self.tiny_overrides)))

    @property
    def grid(self) -> tuple[int, int] | None:
        """(rows, columns) of patch tokens at the target layer; None for a feature-map layout."""
        if self.layout != "tokens" or self.patch_size is None:
            return None
        side = self.input_size // self.patch_size
        return (side, side)

    def get_target_layer(self, encoder: nn.Module) -> nn.Module:
        """The module at :attr:`target_layer` inside ``encoder`` (LoRA-wrapped or not)."""
        return resolve_layer(encoder, self.target_layer)

    def resolved(self, encoder: nn.Module) -> EncoderCard:
        """This card with the sizes read from a built ``encoder`` (they change with overrides)."""
        if self.inspect is None:
            return self
        return dataclasses.replace(self, **self.inspect(encoder))


def resolve_layer(root: nn.Module, path: str) -> nn.Module:
    """Follow an attribute path such as ``transformer.resblocks[-1].ln_1`` from ``root``."""
    current: Any = root
    for part in path.split("."):
        match = _ACCESSOR_PART.match(part)
        if match is None:
            raise ValueError(f"layer path {path!r}: {part!r} is not 'name' or 'name[index]'")
        try:
            current = getattr(current, match["attr"])
            for index in re.findall(r"-?\d+", match["index"]):
                current = current[int(index)]
        except (AttributeError, IndexError, TypeError) as exc:
            raise ValueError(
                f"layer path {path!r} does not exist in {type(root).__name__} ({exc})"
            ) from None
    if not isinstance(current, nn.Module):
        raise ValueError(f"layer path {path!r} names a {type(current).__name__}, not a module")
    return current


_REGISTRY: dict[str, EncoderCard] = {}
_LOCK = threading.Lock()


def register_encoder(card: EncoderCard, *, replace: bool = False) -> EncoderCard:
    """Add an encoder; refuses to silently redefine a name that is taken."""
    with _LOCK:
        if card.name in _REGISTRY and not replace and _REGISTRY[card.name] is not card:
            raise ValueError(f"encoder {card.name!r} is already registered")
        _REGISTRY[card.name] = card
    return card


def get_encoder_card(name: str) -> EncoderCard:
    """The card registered under ``name``.

    Raises
    ------
    ModelLoadError
        Unknown name: fail closed, never another encoder in its place.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelLoadError(
            f"unknown encoder {name!r}; registered encoders: {sorted(_REGISTRY)}"
        ) from None


def list_encoders() -> tuple[EncoderCard, ...]:
    """Every registered card, by name (tests parametrize over this)."""
    return tuple(_REGISTRY[n] for n in sorted(_REGISTRY))


def check_overrides(card: EncoderCard, overrides: Mapping[str, Any]) -> None:
    unknown = sorted(set(overrides) - card.overridable)
    if unknown:
        raise ModelLoadError(
            f"encoder {card.name!r} takes no override {unknown}; "
            f"allowed: {sorted(card.overridable)}"
        )


def build_encoder(card: EncoderCard, overrides: Mapping[str, Any], *, empty: bool) -> nn.Module:
    """Build ``card``'s architecture; ``empty`` skips the random initialisation.

    An empty build (allocated, uninitialised) is for weights that a strict load will overwrite
    entirely: it saves seconds of random init on ViT-L. Encoders with buffers that a state_dict
    does not carry are built normally so that those buffers are initialised.
    """
    check_overrides(card, overrides)
    try:
        if not empty:
            return card.builder(**overrides)
        with torch.device("meta"):
            module = card.builder(**overrides)
        if has_unsaved_buffers(module):
            return card.builder(**overrides)
        return module.to_empty(device="cpu")
    except (TypeError, ValueError, AssertionError) as exc:
        raise ModelLoadError(
            f"encoder {card.name!r} cannot be built with overrides {dict(overrides)}: {exc}"
        ) from exc


def create_encoder(name: str, checkpoint: str | Path | None = None, **overrides: Any) -> nn.Module:
    """Build the encoder registered as ``name``; with ``checkpoint``, load its weights strictly.

    Parameters
    ----------
    name
        Registry key, e.g. ``usf-mae-vit-b16`` or ``fetalclip-vit-l14``.
    checkpoint
        A local weight file in the layout the card's ``checkpoint_filter_fn`` knows. Without it
        the weights are random (for training from scratch and tests).
    overrides
        Architecture arguments listed in ``card.overridable`` (e.g. ``embed_dim=64, depth=2``).

    Raises
    ------
    ModelLoadError
        Unknown name or override, unreadable file, or a checkpoint that does not fit: the message
        lists the missing and unexpected keys and the shape mismatches.
    """
    card = get_encoder_card(name)
    if checkpoint is None:
        return build_encoder(card, overrides, empty=False)
    what = f"checkpoint {str(checkpoint)!r} for encoder {name!r}"
    raw = read_checkpoint(checkpoint)
    try:
        state = card.checkpoint_filter_fn(raw)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{what}: {exc}") from exc
    module = build_encoder(card, overrides, empty=True)
    load_state_strict(module, state, what)
    return module
