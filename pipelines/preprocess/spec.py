"""Preprocessing recipes by name: what each encoder family was trained to see (DESIGN.md §3).

A model version records its spec's name and values (:meth:`PreprocessSpec.as_dict`); training
and inference then build their inputs with the same :func:`~pipelines.preprocess.preprocess`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal

import cv2

from pipelines.preprocess.geometry import PIL_BICUBIC, GridMapping

Geometry = Literal["squash", "pad"]
Interpolation = Literal["nearest", "bicubic", "pil-bicubic"]

#: OpenCV flags. ``INTER_NEAREST_EXACT`` samples at pixel centres, bit-exact with PIL's NEAREST,
#: which USF-MAE's torchvision loader used on PIL images; plain ``INTER_NEAREST`` floors the
#: corner coordinate and shifts the image by up to half a source pixel.
#: ``pil-bicubic`` is PIL's antialiased bicubic, which FetalCLIP's preprocessing used; OpenCV's
#: INTER_CUBIC does not antialias and differs by up to ~70 grey levels at speckle and text edges.
_CV2_INTERPOLATION: Final[dict[str, int]] = {
    "nearest": cv2.INTER_NEAREST_EXACT,
    "bicubic": cv2.INTER_CUBIC,
    "pil-bicubic": PIL_BICUBIC,
}

IMAGENET_MEAN: Final = (0.485, 0.456, 0.406)
IMAGENET_STD: Final = (0.229, 0.224, 0.225)
CLIP_MEAN: Final = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: Final = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True, slots=True)
class PreprocessSpec:
    """How a frame becomes a model input: geometry, interpolation and per-channel normalisation.

    Attributes
    ----------
    name
        Registry key, recorded with every model version.
    geometry
        ``"squash"``: resize to the square ignoring aspect ratio; ``"pad"``: centre on a zero
        (black) square first, keeping the aspect ratio.
    interpolation
        ``"nearest"`` or ``"bicubic"``.
    mean, std
        Per-channel RGB statistics on the 0..1 scale: ``x = (v / 255 - mean) / std``.
    size
        Side of the square input.
    """

    name: str
    geometry: Geometry
    interpolation: Interpolation
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: int = 224

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a preprocessing spec needs a name")
        if self.geometry not in ("squash", "pad"):
            raise ValueError(f"geometry={self.geometry!r}: expected 'squash' or 'pad'")
        if self.interpolation not in _CV2_INTERPOLATION:
            raise ValueError(
                f"interpolation={self.interpolation!r}: "
                f"expected one of {sorted(_CV2_INTERPOLATION)}"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean={self.mean}, std={self.std}: expected three RGB values each")
        if min(self.std) <= 0:
            raise ValueError(f"std={self.std}: every value must be positive")
        if self.size < 1:
            raise ValueError(f"size={self.size}: must be >= 1")

    @property
    def cv2_interpolation(self) -> int:
        """The OpenCV resize flag for :attr:`interpolation`."""
        return _CV2_INTERPOLATION[self.interpolation]

    def to_model_grid(self, height: int, width: int) -> GridMapping:
        """The map from a ``height`` x ``width`` frame to this spec's model grid."""
        if self.geometry == "pad":
            return GridMapping.pad_to_square(height, width, self.size)
        return GridMapping.squash(height, width, self.size)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready record of the spec, stored with each model version."""
        return {
            "name": self.name,
            "geometry": self.geometry,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "size": self.size,
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> PreprocessSpec:
        """Rebuild a spec from :meth:`as_dict` output (validated like any other)."""
        mean, std = (tuple(float(v) for v in record[key]) for key in ("mean", "std"))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean={mean}, std={std}: expected three RGB values each")
        return cls(
            name=str(record["name"]),
            geometry=record["geometry"],
            interpolation=record["interpolation"],
            mean=(mean[0], mean[1], mean[2]),
            std=(std[0], std[1], std[2]),
            size=int(record.get("size", 224)),
        )


#: USF-MAE (ViT-B/16): nearest-neighbour squash to 224, ImageNet statistics.
USF_MAE: Final = PreprocessSpec(
    name="usf-mae",
    geometry="squash",
    interpolation="nearest",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
)
#: FetalCLIP (ViT-L/14): zero-pad to a centred square, bicubic to 224, CLIP statistics.
FETALCLIP: Final = PreprocessSpec(
    name="fetalclip",
    geometry="pad",
    interpolation="pil-bicubic",
    mean=CLIP_MEAN,
    std=CLIP_STD,
)

_REGISTRY: dict[str, PreprocessSpec] = {spec.name: spec for spec in (USF_MAE, FETALCLIP)}
_REGISTRY_LOCK = threading.Lock()


def register_spec(spec: PreprocessSpec) -> PreprocessSpec:
    """Add a spec under its name; a different spec may not take an existing name.

    Raises
    ------
    ValueError
        ``spec.name`` is registered with other values.
    """
    with _REGISTRY_LOCK:
        existing = _REGISTRY.get(spec.name)
        if existing is not None and existing != spec:
            raise ValueError(
                f"preprocessing spec {spec.name!r} is already registered as {existing}"
            )
        _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> PreprocessSpec:
    """The spec registered under ``name``.

    Raises
    ------
    ValueError
        Unknown name (fail closed: never fall back to another model's preprocessing).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown preprocessing spec {name!r}; registered: {sorted(_REGISTRY)}"
        ) from None


def available_specs() -> Mapping[str, PreprocessSpec]:
    """Read-only view of the registry, for listing and for tests that cover every spec."""
    return MappingProxyType(dict(_REGISTRY))
