"""Caliper crosses: thin '+' marks of one level, found by their shape, also on bright bone.

Scanners mark a measurement's end points with a '+' whose arms are 1–2 pixels thick and a few
pixels long, in one colour (white, pale yellow). Where the cross lies on tissue the stroke rules
of :mod:`pipelines.inpaint.core` find it; where it lies on the skull or spine they cannot: bone
is so bright that the cross no longer stands ``contrast`` above its neighbourhood's median, and
the phantoms' grey-style recall stopped at ~0.96. What still sets such a cross apart is its
shape: every pixel of both arms is at one level (exactly, on a frame stored without loss), and
along the arms the pixels that bright form a line at most ``width`` thick, darker on both sides.
Bone speckle under a white cross is as bright as the cross at a quarter of its pixels or so; a
flat '+' that bone holds by itself lies in a bright blob or ridge, thick at most of its length.

Cost: one erosion with a '+' kernel over the whole frame (~0.08 ms for 800×600), then array tests
at its candidates — hundreds on a frame with bone, a handful after the flatness test.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

Plane = NDArray[np.uint8]

#: A flat '+' is a cross when its arms are thin at at least this share of their positions.
#: Measured on 16 phantoms (grey style, raw and JPEG q95–q85, ``tolerance`` 6 on JPEG): crosses
#: on the skull have a median share of 0.75 raw, 0.58–0.67 on JPEG (15 of 16 and 27 of 32 reach
#: 0.5; crosses off bone 0.92–1.0); the flat '+' shapes bone and tissue form by themselves reach
#: at most 0.33 raw, 0.42 on JPEG.
MIN_THIN_SHARE = 0.5


def cross_kernel(arm: int) -> Plane:
    """A '+' structuring element with arms of ``arm`` pixels either side of the centre."""
    side = 2 * arm + 1
    return np.asarray(cv2.getStructuringElement(cv2.MORPH_CROSS, (side, side)), dtype=np.uint8)


def caliper_crosses(
    bright: Plane,
    arm: int,
    threshold: int,
    width: int,
    tolerance: int = 0,
    *,
    out: Plane | None = None,
) -> Plane:
    """Pixels of thin '+' crosses with arms of at least ``arm`` pixels, as a 0/1 plane.

    Parameters
    ----------
    bright
        H×W uint8 brightness (max of R, G, B).
    arm
        Shortest arm looked for, pixels from the centre (≥ ``width``).
    threshold
        Every pixel of a cross is at least this bright.
    width
        Thickest arm, pixels (``InpaintParams.max_stroke_width``).
    tolerance
        0 on frames stored without loss: a cross is drawn in one colour, so its '+' is one exact
        level. On JPEG frames its pixels spread: the '+' may then span ``2·tolerance`` above its
        darkest pixel (its level), and pixels down to ``tolerance`` below the level count as the
        line when testing how thick it is (JPEG's blur otherwise makes bone ridges look thin).
    out
        An H×W uint8 plane to set the crosses' pixels to 1 in (left as it is elsewhere) and
        return; a new zero plane when ``None``.

    Returns
    -------
    numpy.ndarray
        H×W uint8 of 0 and 1: each accepted cross's '+' of ``arm``, each arm continued for as long
        as it stays at the cross's level, up to twice ``arm``. Crosses closer than ``2·arm`` to
        the frame's edge are not looked for.
    """
    if arm < width or width < 1:
        raise ValueError(f"arm={arm}, width={width}: expected 1 ≤ width ≤ arm")
    height, frame_width = bright.shape
    out = np.zeros(bright.shape, np.uint8) if out is None else out
    reach = 2 * arm  # farthest pixel read from a centre: arm extension, or profile side
    if height <= 2 * reach or frame_width <= 2 * reach:
        return out
    kernel = cross_kernel(arm)
    low = np.asarray(cv2.erode(bright, kernel))
    # Crosses cut by the frame's edge are left alone: their profiles would leave the frame.
    # numpy booleans, not OpenCV's 0/255: np.flatnonzero of a bool array is ~15x faster.
    inner = low[reach:-reach, reach:-reach] >= threshold
    where = np.flatnonzero(inner)
    if not where.size:
        return out
    rows, columns = np.divmod(where, inner.shape[1])
    where = (rows + reach) * frame_width + columns + reach
    # Flat: the brightest pixel of the '+' within ``2·tolerance`` of its darkest. Tested at the
    # candidates only (hundreds on a frame with bone), cheaper than a whole-frame dilation.
    plane = bright.reshape(-1)
    level = low.reshape(-1)[where].astype(np.int16)
    steps = np.arange(1, arm + 1)
    plus = np.concatenate([[0], steps, -steps, steps * frame_width, -steps * frame_width])
    top = plane[where[:, None] + plus[None, :]].max(axis=1)
    flat = top - level <= 2 * tolerance
    where, level = where[flat], level[flat]
    if not where.size:
        return out
    thin = _thin_share(plane, frame_width, where, level - tolerance, arm, width) >= MIN_THIN_SHARE
    where, level = where[thin], level[thin, None]
    if not where.size:
        return out
    marks = out.reshape(-1)
    marks[where] = 1
    for step in (1, -1, frame_width, -frame_width):
        along = where[:, None] + step * np.arange(1, reach + 1)[None, :]
        # The first ``arm`` pixels are the cross by construction; past them, as long as it lasts.
        value = plane[along]
        on = (value >= level - tolerance) & (value <= level + 2 * tolerance)
        on[:, :arm] = True
        on = np.cumprod(on, axis=1).astype(bool)
        marks[along[on]] = 1
    return out


def _thin_share(
    plane: NDArray[np.uint8],
    frame_width: int,
    where: NDArray[np.intp],
    level: NDArray[np.int16],
    arm: int,
    width: int,
) -> NDArray[np.float64]:
    """Per centre, the share of arm positions where the arm is a line at most ``width`` thick.

    At each position ``width``..``arm`` pixels out along each of the four arms (nearer, the
    other arm or the arm's own thickness is what lies beside it), the pixels at least ``level``
    across the arm form a run through it; the arm is thin there when that run is at most
    ``width`` long, so that darker pixels bound it on both sides within ``width + 1``.
    """
    reach = width + 1
    across = np.arange(-reach, reach + 1)
    offsets = []
    for step, normal in ((1, frame_width), (-1, frame_width), (frame_width, 1), (-frame_width, 1)):
        for k in range(width, arm + 1):
            offsets.append(step * k + normal * across)
    profile = plane[where[:, None, None] + np.asarray(offsets)[None, :, :]]
    like = profile >= level[:, None, None]
    # Run of like pixels from the arm outwards, each way (the arm pixel itself is like).
    up = np.cumprod(like[:, :, reach + 1 :], axis=2).sum(axis=2)
    down = np.cumprod(like[:, :, reach - 1 :: -1], axis=2).sum(axis=2)
    thin = up + down + 1 <= width
    share: NDArray[np.float64] = thin.mean(axis=1)
    return share
