"""Sector geometry, speckle and log compression: the physics every phantom scene shares.

A scene is an *echogenicity map* (linear backscatter, 1.0 = bone) inside a convex sector. Real
B-mode images are the envelope of a coherent sum of scatterers, so we multiply the map by a
correlated Rayleigh field (the magnitude of blurred complex Gaussian noise) and log-compress it into
the display range — which gives speckle the grain, the heavy bright tail and the saturated bone that
the scrub and inpaint stages must cope with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from pipelines.phantom.params import FanParams, PhantomParams

FloatImage = NDArray[np.float32]
Mask = NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class Box:
    """Inclusive pixel box, the convention of Region Location Min/Max (0018,6018..601E)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0 + 1

    @property
    def height(self) -> int:
        return self.y1 - self.y0 + 1


@dataclass(frozen=True, slots=True)
class Fan:
    """A convex sector: apex ``(cx, apex_y)``, radii ``r0 < r1``, half opening angle (radians)."""

    cx: float
    apex_y: float
    r0: float
    r1: float
    half_angle: float

    @classmethod
    def from_params(cls, params: PhantomParams) -> Fan:
        fan: FanParams = params.fan
        half = math.radians(fan.half_angle_deg)
        apex_y = fan.top - fan.inner_radius * math.cos(half)
        return cls(params.width / 2.0, apex_y, fan.inner_radius, fan.outer_radius, half)

    def polar(self, height: int, width: int) -> tuple[FloatImage, FloatImage]:
        """Radius from the apex and angle from the beam axis of every pixel centre."""
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        dx, dy = xs - np.float32(self.cx), ys - np.float32(self.apex_y)
        return np.hypot(dx, dy), np.arctan2(dx, dy)

    def mask(self, height: int, width: int) -> Mask:
        radius, angle = self.polar(height, width)
        inside: Mask = (
            (radius >= self.r0) & (radius <= self.r1) & (np.abs(angle) <= self.half_angle)
        )
        return inside

    def point(self, depth_fraction: float, angle_fraction: float) -> tuple[float, float]:
        """Pixel position at a fraction of the depth range and of the half angle (-1..1)."""
        radius = self.r0 + depth_fraction * (self.r1 - self.r0)
        angle = angle_fraction * self.half_angle
        return self.cx + radius * math.sin(angle), self.apex_y + radius * math.cos(angle)


def abdominal_wall(echo: FloatImage, fan: Fan, rng: np.random.Generator, fraction: float) -> None:
    """Overwrite the near field with the maternal abdominal wall, in place.

    Skin (a bright line), subcutaneous fat (dark), then striated muscle: every obstetric image
    starts with these layers, whatever lies deeper.
    """
    shape = (echo.shape[0], echo.shape[1])
    radius, _ = fan.polar(*shape)
    depth = (radius - np.float32(fan.r0)) / np.float32(fan.r1 - fan.r0)
    texture = 1.0 + 0.3 * smooth_noise(rng, shape, 9)
    stripes = 1.0 + 0.5 * np.sin(depth * np.float32(2 * math.pi * 40.0 / max(fraction, 1e-3)))
    wall = np.where(depth < fraction * 0.35, 0.06, 0.16 * stripes).astype(np.float32) * texture
    wall[depth < 0.015] = 0.6
    inside = depth < fraction
    echo[inside] = wall[inside]


def bounding_box(mask: Mask) -> Box:
    """Tight inclusive box of a non-empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("bounding_box of an empty mask")
    return Box(int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))


def speckle_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> FloatImage:
    """Complex Gaussian scatterers blurred by the point-spread function (before detection)."""
    real = rng.standard_normal(shape, dtype=np.float32)
    imag = rng.standard_normal(shape, dtype=np.float32)
    field = np.stack([real, imag], axis=-1)
    return np.asarray(cv2.GaussianBlur(field, (0, 0), sigma), dtype=np.float32)


def envelope(field: FloatImage) -> FloatImage:
    """Detected envelope, normalised to mean 1: Rayleigh distributed, as fully developed speckle."""
    magnitude = np.hypot(field[..., 0], field[..., 1])
    result: FloatImage = (magnitude / np.float32(magnitude.mean() + 1e-12)).astype(np.float32)
    return result


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> FloatImage:
    """Low-frequency texture in about [-1, 1]: tissue is never perfectly homogeneous."""
    coarse = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    resized = cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return np.asarray(resized, dtype=np.float32)


def log_compress(echo: FloatImage, dynamic_range_db: float) -> NDArray[np.uint8]:
    """Map backscatter to grey levels: 0 dB (bone) is white, ``-dynamic_range_db`` black."""
    db = 20.0 * np.log10(np.maximum(echo, 1e-6))
    grey = np.clip(255.0 * (1.0 + db / dynamic_range_db), 0.0, 255.0)
    return np.rint(grey).astype(np.uint8)


def render(
    echo: FloatImage, speckle: FloatImage, fan_mask: Mask, dynamic_range_db: float
) -> NDArray[np.uint8]:
    """Grey B-mode frame: soften the anatomy's edges, apply speckle, compress, black outside."""
    soft = cv2.GaussianBlur(echo, (0, 0), 1.2)
    grey = log_compress(soft * speckle, dynamic_range_db)
    grey[~fan_mask] = 0
    return grey


def ellipse(
    canvas: NDArray[np.uint8] | FloatImage,
    centre: tuple[float, float],
    axes: tuple[float, float],
    angle_deg: float,
    value: float,
    thickness: int = -1,
) -> None:
    """Draw a filled (or ``thickness``-wide) ellipse with sub-pixel centre in place."""
    shift = 4
    scale = 1 << shift
    cv2.ellipse(
        canvas,
        (round(centre[0] * scale), round(centre[1] * scale)),
        (max(1, round(axes[0] * scale)), max(1, round(axes[1] * scale))),
        angle_deg,
        0,
        360,
        value,
        thickness,
        cv2.LINE_8,
        shift,
    )


def rotate(vec: tuple[float, float], angle_deg: float) -> tuple[float, float]:
    """Rotate a vector in image coordinates (y down) by ``angle_deg`` as cv2.ellipse does."""
    a = math.radians(angle_deg)
    return vec[0] * math.cos(a) - vec[1] * math.sin(a), vec[0] * math.sin(a) + vec[1] * math.cos(a)


def at(centre: tuple[float, float], angle_deg: float, u: float, v: float) -> tuple[float, float]:
    """Point at local coordinates ``(u, v)`` of a frame rotated ``angle_deg`` about ``centre``."""
    du, dv = rotate((u, v), angle_deg)
    return centre[0] + du, centre[1] + dv
