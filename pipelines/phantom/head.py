"""Transventricular plane of a fetal head with a controllable lateral-ventricle atrium.

The atrium is measured, as sonographers do, across its width at the glomus of the choroid plexus,
perpendicular to the ventricle's long axis, inner wall to inner wall. We draw it as an anechoic
ellipse whose full minor axis *is* that width, so the label (atrial diameter in mm, ventriculomegaly
at ≥ 10 mm) is exact given the pixel spacing, and the caliper end points are known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipelines.phantom.params import HeadParams
from pipelines.phantom.scene import FloatImage, Mask, at, ellipse, rotate, smooth_noise

#: Linear backscatter of each tissue (1.0 = bone); log-compressed later.
BONE, BRAIN, FLUID, MATERNAL, FALX, PLEXUS = 1.0, 0.05, 0.004, 0.13, 0.35, 0.4


@dataclass(frozen=True, slots=True)
class Measurement:
    """A caliper pair and the read-out a scanner would print for it."""

    name: str
    start: tuple[float, float]
    end: tuple[float, float]
    value_mm: float


@dataclass(frozen=True, slots=True)
class HeadLayout:
    """Random draws of one head, fixed for every frame of a cine."""

    centre: tuple[float, float]
    semi_ofd: float
    semi_bpd: float
    tilt_deg: float
    facing: int
    atrial_width_mm: float
    ventricle_angle_deg: float


def draw_layout(
    rng: np.random.Generator,
    params: HeadParams,
    fan_point: tuple[float, float],
    atrial_width_mm: float | None,
) -> HeadLayout:
    """Place the head around ``fan_point`` and choose the atrial width unless it is given."""
    lo, hi = params.atrial_width_range_mm
    width = float(rng.uniform(lo, hi)) if atrial_width_mm is None else float(atrial_width_mm)
    if not 1.0 <= width <= 30.0:
        raise ValueError(f"atrial_width_mm={width}: expected 1..30 mm")
    semi_bpd = params.bpd_mm / 2.0 / params.mm_per_pixel
    return HeadLayout(
        centre=fan_point,
        semi_ofd=semi_bpd * params.ofd_over_bpd,
        semi_bpd=semi_bpd,
        tilt_deg=float(rng.uniform(-params.max_tilt_deg, params.max_tilt_deg)),
        facing=int(rng.choice([-1, 1])),
        atrial_width_mm=width,
        ventricle_angle_deg=float(rng.uniform(8.0, 16.0)),
    )


def render_head(
    layout: HeadLayout, params: HeadParams, shape: tuple[int, int], rng: np.random.Generator
) -> tuple[FloatImage, Mask, Mask, list[Measurement]]:
    """Echogenicity map, bone mask, ventricle mask and the two standard measurements."""
    echo = np.full(shape, MATERNAL, dtype=np.float32)
    echo *= 1.0 + 0.35 * smooth_noise(rng, shape, 7)
    c, tilt, a, b = layout.centre, layout.tilt_deg, layout.semi_ofd, layout.semi_bpd
    ellipse(echo, c, (a * 1.45, b * 1.6), tilt, FLUID)  # amniotic fluid around the head
    brain = np.full(shape, BRAIN, dtype=np.float32) * (1.0 + 0.4 * smooth_noise(rng, shape, 9))
    inside = np.zeros(shape, np.uint8)
    ellipse(inside, c, (a, b), tilt, 1)
    echo[inside > 0] = brain[inside > 0]

    skull_px = params.skull_mm / params.mm_per_pixel
    ring = np.zeros(shape, np.uint8)
    ellipse(ring, c, (a - skull_px / 2, b - skull_px / 2), tilt, 1, max(2, round(skull_px)))
    bone = ring > 0
    # Bone facing the beam reflects strongly; bone parallel to it (the sides) much less.
    ys, xs = np.nonzero(bone)
    u, v = _local(c, tilt, xs.astype(np.float32), ys.astype(np.float32))
    normal = np.arctan2(v / b**2, u / a**2) + math.radians(tilt)
    echo[ys, xs] = BONE * (0.3 + 0.7 * np.abs(np.sin(normal)))

    sign = layout.facing  # +1: occiput to the right of the frame
    ellipse(echo, at(c, tilt, 0.0, 0.0), (a * 0.92, 1.2), tilt, FALX)  # falx / midline echo
    csp = at(c, tilt, -sign * 0.35 * a, 0.0)
    ellipse(echo, csp, (0.1 * a, 0.06 * b), tilt, FALX, 2)  # cavum septi pellucidi walls
    ellipse(echo, csp, (0.1 * a - 2, 0.06 * b - 2), tilt, FLUID)

    mm = params.mm_per_pixel
    half_width = layout.atrial_width_mm / 2.0 / mm
    semi_length = max(layout.atrial_width_mm, 9.0) / mm
    vangle = tilt - sign * layout.ventricle_angle_deg
    atrium = at(c, tilt, sign * 0.42 * a, 0.42 * b)  # far hemisphere, occipital horn region
    wall = np.zeros(shape, np.uint8)
    ellipse(wall, atrium, (semi_length + 3, half_width + 3), vangle, 1)
    echo[wall > 0] = FALX * 0.6  # ependymal lining, brighter than brain
    ellipse(echo, atrium, (semi_length, half_width), vangle, FLUID)
    ventricle = np.zeros(shape, np.uint8)
    ellipse(ventricle, atrium, (semi_length, half_width), vangle, 1)
    plexus_half = min(half_width * 0.8, 3.2 / mm)
    plexus_c = at(atrium, vangle, -sign * 0.2 * semi_length, half_width - plexus_half)
    ellipse(echo, plexus_c, (semi_length * 0.6, plexus_half), vangle, PLEXUS)

    # A fainter near-field ventricle (reverberation usually hides it).
    near = at(c, tilt, sign * 0.42 * a, -0.42 * b)
    ellipse(echo, near, (semi_length, half_width * 0.7), tilt + sign * 12, BRAIN * 0.5)

    n = rotate((0.0, 1.0), vangle)
    measurements = [
        Measurement(
            "Atr",
            (atrium[0] - n[0] * half_width, atrium[1] - n[1] * half_width),
            (atrium[0] + n[0] * half_width, atrium[1] + n[1] * half_width),
            layout.atrial_width_mm,
        ),
        Measurement(
            "BPD",
            at(c, tilt, 0.0, -b),  # outer-to-inner: leading edge of both parietal bones
            at(c, tilt, 0.0, b - skull_px),
            (2 * b - skull_px) * mm,
        ),
    ]
    return echo, bone, ventricle > 0, measurements


def _local(
    c: tuple[float, float], tilt_deg: float, xs: np.ndarray, ys: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates into the head's own (u along OFD, v along BPD) frame."""
    t = math.radians(tilt_deg)
    dx, dy = xs - c[0], ys - c[1]
    return dx * math.cos(t) + dy * math.sin(t), -dx * math.sin(t) + dy * math.cos(t)


def head_mask(layout: HeadLayout, shape: tuple[int, int]) -> Mask:
    """Pixels inside the outer skull table (used by tests as 'the anatomy')."""
    canvas = np.zeros(shape, np.uint8)
    ellipse(canvas, layout.centre, (layout.semi_ofd, layout.semi_bpd), layout.tilt_deg, 1)
    inside: Mask = canvas > 0
    return inside
