"""Parameters of the synthetic fetal-ultrasound phantom (frozen, with realistic defaults).

Sizes are in pixels unless the name says ``mm``; the defaults give an 800×600 frame laid out the
way most cart-based scanners lay out a B-mode screen: a burned-in patient strip at the top, a convex
sector below it, a depth scale and technical read-outs beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

#: The classes of the first-trimester fetal-heart task (DESIGN.md §3, arXiv 2512.24492).
HEART_VIEWS: tuple[str, ...] = ("aorta", "atrioventricular_flows", "v_sign", "x_sign", "other")

#: Atrial diameter at or above which a transventricular plane is labelled ventriculomegaly.
VENTRICULOMEGALY_MM = 10.0

AnnotationStyle = Literal["colour", "grey", "none"]


@dataclass(frozen=True, slots=True)
class FanParams:
    """Convex-probe sector: apex above the frame, inner and outer radius, half opening angle."""

    top: int = 60
    half_angle_deg: float = 35.0
    inner_radius: int = 60
    outer_radius: int = 510
    #: Standard deviation (pixels) of the Gaussian point-spread that gives speckle its grain.
    speckle_sigma: float = 1.0
    #: Display dynamic range of the log compression, dB.
    dynamic_range_db: float = 42.0
    #: Maternal abdominal wall (skin, fat, muscle) as a fraction of the depth range.
    wall_fraction: float = 0.12


@dataclass(frozen=True, slots=True)
class HeadParams:
    """Transventricular plane of a second-trimester head (BPD ≈ 48 mm at 20 weeks)."""

    mm_per_pixel: float = 0.2
    bpd_mm: float = 48.0
    #: Occipito-frontal over biparietal diameter (cephalic index ≈ 0.8).
    ofd_over_bpd: float = 1.25
    skull_mm: float = 2.4
    #: Atrial width range drawn when the caller does not fix it; straddles the 10 mm cut-off.
    atrial_width_range_mm: tuple[float, float] = (5.0, 15.0)
    max_tilt_deg: float = 20.0


@dataclass(frozen=True, slots=True)
class HeartParams:
    """Zoomed first-trimester thorax: pixel spacing of a magnified 12-week heart."""

    mm_per_pixel: float = 0.04
    #: Thorax radius as a fraction of the sector depth.
    thorax_fraction: float = 0.34
    max_tilt_deg: float = 25.0


@dataclass(frozen=True, slots=True)
class AnnotationParams:
    """Burned-in patient strip, calipers, depth scale and read-outs."""

    phi_band_height: int = 36
    phi_band_grey: int = 24
    phi_text_grey: int = 225
    font_scale: float = 0.5
    caliper_arm: int = 5
    dot_length: int = 2
    dot_gap: int = 4
    #: Calipers of the ``colour`` style, RGB: yellow, green, cyan as scanners draw them.
    colours: tuple[tuple[int, int, int], ...] = ((255, 255, 0), (0, 255, 0), (0, 255, 255))
    #: Calipers of the ``grey`` style, RGB: white and the pale yellow many scanners use.
    greys: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (255, 250, 170))
    depth_tick_cm: float = 1.0


@dataclass(frozen=True, slots=True)
class PhantomParams:
    """Everything a phantom frame depends on besides its seed."""

    width: int = 800
    height: int = 600
    fan: FanParams = field(default_factory=FanParams)
    head: HeadParams = field(default_factory=HeadParams)
    heart: HeartParams = field(default_factory=HeartParams)
    annotation: AnnotationParams = field(default_factory=AnnotationParams)

    def __post_init__(self) -> None:
        fan = self.fan
        if self.width < 200 or self.height < 200:
            raise ValueError(f"phantom size {self.width}x{self.height}: expected at least 200x200")
        if fan.top <= self.annotation.phi_band_height:
            raise ValueError(
                f"fan.top={fan.top} must lie below the PHI band "
                f"(phi_band_height={self.annotation.phi_band_height})"
            )
        apex_y = fan.top - fan.inner_radius * math.cos(math.radians(fan.half_angle_deg))
        if apex_y + fan.outer_radius >= self.height - 1:
            raise ValueError(
                f"fan outer_radius={fan.outer_radius} does not fit in {self.height} rows"
            )
        if 2 * fan.outer_radius * math.sin(math.radians(fan.half_angle_deg)) >= self.width - 20:
            raise ValueError(
                f"fan outer_radius={fan.outer_radius} does not fit in {self.width} columns"
            )
