"""First-trimester fetal thorax with the colour-flow patterns of the heart_view classes.

Each class shows what the sonographer looks for (arXiv 2512.24492):

- ``aorta``: four chambers plus one red jet leaving the left ventricle (outflow tract);
- ``atrioventricular_flows``: two parallel red inflow jets across the mitral and tricuspid valves;
- ``v_sign``: three-vessel-trachea plane, aortic and ductal arches (both blue) converging in a V;
- ``x_sign``: the great arteries crossing, one red and one blue, in an X;
- ``other``: a grey four-chamber view without colour.

Colour is painted like a velocity map: dark at the vessel wall, bright (aliasing to yellow or cyan)
on the axis, the parabolic profile of laminar flow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from pipelines.phantom.head import Measurement
from pipelines.phantom.params import HEART_VIEWS, HeartParams
from pipelines.phantom.scene import FloatImage, Mask, at, ellipse, smooth_noise

BONE, LUNG, MYOCARDIUM, BLOOD, FLUID, MATERNAL = 1.0, 0.1, 0.2, 0.004, 0.004, 0.13
Point = tuple[float, float]


@dataclass(frozen=True, slots=True)
class HeartLayout:
    """Random draws of one thorax, fixed for every frame of a cine."""

    view: str
    centre: Point
    radius: float
    tilt_deg: float


def draw_layout(
    rng: np.random.Generator, params: HeartParams, centre: Point, depth: float, view: str | None
) -> HeartLayout:
    """Choose the view (unless given), size and orientation of the thorax."""
    chosen = str(rng.choice(HEART_VIEWS)) if view is None else view
    if chosen not in HEART_VIEWS:
        raise ValueError(f"heart view {chosen!r}: expected one of {HEART_VIEWS}")
    tilt = float(rng.uniform(-params.max_tilt_deg, params.max_tilt_deg))
    return HeartLayout(chosen, centre, params.thorax_fraction * depth, tilt)


def render_heart(
    layout: HeartLayout,
    params: HeartParams,
    shape: tuple[int, int],
    rng: np.random.Generator,
    phase: float = 0.0,
) -> tuple[FloatImage, Mask, list[tuple[list[Point], int, float]], list[Measurement]]:
    """Echogenicity map, bone mask, the flow paths and one measurement.

    Flow paths are ``(points, direction, width)`` with direction +1 towards the probe (red) and
    -1 away (blue); :func:`paint_flows` turns them into colour after speckle and compression.
    ``phase`` in [0, 1) beats the heart in a cine.
    """
    echo = np.full(shape, MATERNAL, dtype=np.float32) * (1.0 + 0.35 * smooth_noise(rng, shape, 7))
    c, r, t = layout.centre, layout.radius, layout.tilt_deg
    ellipse(echo, c, (r * 1.5, r * 1.35), t, FLUID)
    lung = np.full(shape, LUNG, np.float32) * (1.0 + 0.3 * smooth_noise(rng, shape, 11))
    thorax = np.zeros(shape, np.uint8)
    ellipse(thorax, c, (r, r * 0.92), t, 1)
    echo[thorax > 0] = lung[thorax > 0]

    bone_canvas = np.zeros(shape, np.uint8)
    ellipse(bone_canvas, at(c, t, 0.0, 0.72 * r), (0.12 * r, 0.1 * r), t, 1)  # vertebral body
    for side in (-1, 1):
        ellipse(bone_canvas, at(c, t, side * 0.16 * r, 0.84 * r), (0.05 * r, 0.08 * r), t, 1)
        for k in range(3):  # ribs: short arcs at the thorax wall
            angle = math.radians(t + 90 + side * (40 + 30 * k))
            p = (c[0] + 0.96 * r * math.cos(angle), c[1] + 0.9 * r * math.sin(angle))
            ellipse(bone_canvas, p, (0.09 * r, 0.025 * r), math.degrees(angle) + 90, 1)
    bone = bone_canvas > 0
    echo[bone] = BONE
    ellipse(echo, at(c, t, -0.2 * r, 0.5 * r), (0.07 * r, 0.07 * r), 0, BLOOD)  # descending aorta

    flows: list[tuple[list[Point], int, float]] = []
    beat = 1.0 + 0.06 * math.sin(2 * math.pi * phase)
    hc, ht = at(c, t, -0.08 * r, -0.12 * r), t - 45.0  # heart axis points to the left, anterior
    if layout.view in ("v_sign", "x_sign"):
        # Three-vessel-trachea plane: no chambers, arches above the spine.
        ellipse(echo, at(c, t, 0.12 * r, 0.3 * r), (0.06 * r, 0.06 * r), 0, BLOOD)  # trachea
        ellipse(echo, at(c, t, 0.12 * r, 0.3 * r), (0.08 * r, 0.08 * r), 0, 0.5, 2)
        w = 0.09 * r
        if layout.view == "v_sign":
            apex = at(c, t, -0.1 * r, 0.35 * r)
            for u in (-0.55, -0.05):
                start = at(c, t, u * r, -0.55 * r)
                flows.append(([start, _mid(start, apex, 0.04 * r), apex], -1, w))
        else:
            flows.append(([at(c, t, -0.6 * r, -0.5 * r), at(c, t, 0.3 * r, 0.35 * r)], 1, w))
            flows.append(([at(c, t, 0.25 * r, -0.55 * r), at(c, t, -0.5 * r, 0.3 * r)], -1, w))
        for path, _, width in flows:
            _vessel(echo, path, width)
        # Vessel diameter across the first vessel, a third of the way along it.
        (x0, y0), (x1, y1) = flows[0][0][0], flows[0][0][-1]
        n = math.hypot(x1 - x0, y1 - y0) or 1.0
        px, py = x0 + (x1 - x0) / 3, y0 + (y1 - y0) / 3
        nx, ny = -(y1 - y0) / n * w / 2, (x1 - x0) / n * w / 2
        vessel = Measurement("Ves", (px - nx, py - ny), (px + nx, py + ny), w * params.mm_per_pixel)
        return echo, bone, flows, [vessel]

    hr = 0.6 * r * beat
    ellipse(echo, hc, (hr, hr * 0.8), ht, MYOCARDIUM)
    chambers = {
        "LA": at(hc, ht, -0.45 * hr, -0.3 * hr * 0.8),
        "RA": at(hc, ht, -0.45 * hr, 0.3 * hr * 0.8),
        "LV": at(hc, ht, 0.3 * hr, -0.3 * hr * 0.8),
        "RV": at(hc, ht, 0.3 * hr, 0.3 * hr * 0.8),
    }
    for name, p in chambers.items():
        size = (0.3 * hr, 0.2 * hr) if name.endswith("A") else (0.42 * hr, 0.2 * hr)
        ellipse(echo, p, size, ht, BLOOD)
    if layout.view == "aorta":
        lv = chambers["LV"]
        flows.append(
            ([lv, at(hc, ht, -0.3 * hr, -0.05 * hr), at(hc, ht, -0.9 * hr, 0.3 * hr)], 1, 0.12 * hr)
        )
    elif layout.view == "atrioventricular_flows":
        for atrium, ventricle in (("LA", "LV"), ("RA", "RV")):
            flows.append(([chambers[atrium], chambers[ventricle]], 1, 0.2 * hr))
    for path, _, width in flows:
        _vessel(echo, path, width)
    length_mm = 2 * hr * params.mm_per_pixel
    measurement = Measurement("HL", at(hc, ht, -hr, 0), at(hc, ht, hr, 0), length_mm)
    return echo, bone, flows, [measurement]


def _mid(a: Point, b: Point, bulge: float) -> Point:
    """Midpoint of ``a``–``b`` pushed sideways: arches are curved, not straight."""
    mx, my = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
    dx, dy = b[0] - a[0], b[1] - a[1]
    n = math.hypot(dx, dy) or 1.0
    return mx - dy / n * bulge, my + dx / n * bulge


def _path_mask(shape: tuple[int, int], path: list[Point], width: float) -> NDArray[np.uint8]:
    canvas = np.zeros(shape, np.uint8)
    pts = np.array([[round(x), round(y)] for x, y in path], dtype=np.int32)
    cv2.polylines(canvas, [pts], False, 255, max(2, round(width)), cv2.LINE_8)
    return canvas


def _vessel(echo: FloatImage, path: list[Point], width: float) -> None:
    """Lumen of a vessel (anechoic) with a brighter wall, under where the colour will go."""
    shape = (echo.shape[0], echo.shape[1])
    echo[_path_mask(shape, path, width + 4) > 0] = MYOCARDIUM * 1.5
    echo[_path_mask(shape, path, width) > 0] = BLOOD


def paint_flows(
    rgb: NDArray[np.uint8], flows: list[tuple[list[Point], int, float]], fan: Mask
) -> Mask:
    """Paint colour-Doppler velocity into ``rgb`` in place and return the coloured pixels."""
    shape = (rgb.shape[0], rgb.shape[1])
    painted = np.zeros(shape, bool)
    for path, direction, width in flows:
        lumen = _path_mask(shape, path, width)
        dist = cv2.distanceTransform(lumen, cv2.DIST_L2, 3)
        speed = np.clip(dist / max(width / 2.0, 1.0), 0.0, 1.0)
        where = (lumen > 0) & fan
        s = speed[where]
        ramp = np.clip(100 + 155 * s, 0, 255)
        alias = np.clip((s - 0.65) / 0.35, 0, 1) * 210
        if direction > 0:  # towards the probe: red, aliasing to yellow on the axis
            colour = np.stack([ramp, alias, alias * 0.3], axis=-1)
        else:  # away: blue, aliasing to cyan
            colour = np.stack([alias * 0.3, alias, ramp], axis=-1)
        rgb[where] = colour.astype(np.uint8)
        painted |= where
    return painted
