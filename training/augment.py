"""The papers' geometric augmentations, applied to batches of preprocessed tensors.

Rotation, horizontal and vertical flips and a random resized crop (DESIGN.md §3) compose into one
affine map per image, applied with a single ``grid_sample`` over the batch: no per-image Python
work and no trip back to uint8. Where the map reaches outside the frame (rotated corners, a crop
scale above 1 that zooms out) the image is padded with *black* — the normalised value of grey level
0 in the model's own preprocessing — as PIL pads before normalisation, not with the mean.
No colour or brightness augmentation: the ventriculomegaly paper rules it out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipelines.preprocess import PreprocessSpec, normalisation_table


@dataclass(frozen=True, slots=True)
class Augmentation:
    """Random geometry per training image.

    Attributes
    ----------
    rotation_deg
        Angles are drawn uniformly from ``[-rotation_deg, rotation_deg]`` (torchvision's
        ``RandomRotation(degrees)``); the papers' "rotation 0–90°" is ``90``.
    hflip, vflip
        Probability of a horizontal / vertical flip.
    crop_scale
        Area of the random crop relative to the frame, drawn uniformly (torchvision's
        ``RandomResizedCrop`` scale); values above 1 zoom out. ``None``: no crop.
    crop_ratio
        Range of the crop's aspect ratio, drawn log-uniformly.
    """

    rotation_deg: float = 0.0
    hflip: float = 0.0
    vflip: float = 0.0
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rotation_deg <= 180.0:
            raise ValueError(f"rotation_deg={self.rotation_deg}: expected 0..180")
        for name in ("hflip", "vflip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: expected a probability 0..1")
        if self.crop_scale is not None:
            lo, hi = self.crop_scale
            if not 0.0 < lo <= hi:
                raise ValueError(f"crop_scale={self.crop_scale}: expected 0 < low ≤ high")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"crop_ratio={self.crop_ratio}: expected 0 < low ≤ high")

    @property
    def active(self) -> bool:
        return bool(self.rotation_deg or self.hflip or self.vflip or self.crop_scale)

    def as_dict(self) -> dict[str, object]:
        return {
            "rotation_deg": self.rotation_deg,
            "hflip": self.hflip,
            "vflip": self.vflip,
            "crop_scale": list(self.crop_scale) if self.crop_scale else None,
            "crop_ratio": list(self.crop_ratio),
        }


#: No augmentation (evaluation, and tests that need exact inputs).
NONE = Augmentation()


def black_level(spec: PreprocessSpec) -> torch.Tensor:
    """``(3,)`` normalised value of grey level 0 under ``spec``: what padding must be."""
    return torch.from_numpy(normalisation_table(spec)[:, 0].copy())


def affine_matrices(
    batch: int, augmentation: Augmentation, generator: torch.Generator
) -> torch.Tensor:
    """``(batch, 2, 3)`` maps from output to input coordinates (``affine_grid`` convention).

    In normalised coordinates (-1..1) a crop of width ``w`` and height ``h`` (fractions of the
    frame) centred at ``(tx, ty)``, rotated by ``θ`` and flipped, samples the input at
    ``R(θ) · diag(±w, ±h) · p + (tx, ty)`` for every output point ``p``.
    """
    a = augmentation

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(batch, generator=generator, dtype=torch.float64)

    theta = torch.deg2rad(uniform(-a.rotation_deg, a.rotation_deg))
    if a.crop_scale is not None:
        area = uniform(*a.crop_scale)
        ratio = torch.exp(uniform(math.log(a.crop_ratio[0]), math.log(a.crop_ratio[1])))
        width, height = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
        # Anywhere the crop stays inside the frame (or, zoomed out, the frame inside the crop).
        tx = uniform(-1.0, 1.0) * (1.0 - width).abs()
        ty = uniform(-1.0, 1.0) * (1.0 - height).abs()
    else:
        width = height = torch.ones(batch, dtype=torch.float64)
        tx = ty = torch.zeros(batch, dtype=torch.float64)
    hflip = torch.rand(batch, generator=generator, dtype=torch.float64) < a.hflip
    vflip = torch.rand(batch, generator=generator, dtype=torch.float64) < a.vflip
    sx = width * torch.where(hflip, -1.0, 1.0)
    sy = height * torch.where(vflip, -1.0, 1.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    rows = [
        torch.stack([cos * sx, -sin * sy, tx], dim=1),
        torch.stack([sin * sx, cos * sy, ty], dim=1),
    ]
    return torch.stack(rows, dim=1)


def augment_batch(
    images: torch.Tensor,
    augmentation: Augmentation,
    generator: torch.Generator,
    black: torch.Tensor,
) -> torch.Tensor:
    """Apply one random draw of ``augmentation`` to each image of ``(N, 3, S, S)`` ``images``.

    Bilinear resampling; ``black`` (:func:`black_level`) fills what lies outside the frame.
    Returns ``images`` itself when the augmentation does nothing.
    """
    if not augmentation.active:
        return images
    if not augmentation.rotation_deg and augmentation.crop_scale is None:
        return _flip(images, augmentation, generator)
    matrices = affine_matrices(images.shape[0], augmentation, generator)
    grid = F.affine_grid(
        matrices.to(device=images.device, dtype=images.dtype),
        list(images.shape),
        align_corners=False,
    )
    # Sample the image relative to black, so that zero padding *is* black.
    offset = black.to(device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    warped = F.grid_sample(
        images - offset, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return warped + offset


def _flip(
    images: torch.Tensor, augmentation: Augmentation, generator: torch.Generator
) -> torch.Tensor:
    """Flips alone, as index reversals: exact, and ~10x cheaper than resampling a grid."""
    n = images.shape[0]
    hflip = torch.rand(n, generator=generator, dtype=torch.float64) < augmentation.hflip
    vflip = torch.rand(n, generator=generator, dtype=torch.float64) < augmentation.vflip
    hflip, vflip = hflip.to(images.device), vflip.to(images.device)
    out = images.clone()
    out[hflip] = out[hflip].flip(-1)
    out[vflip] = out[vflip].flip(-2)
    return out
