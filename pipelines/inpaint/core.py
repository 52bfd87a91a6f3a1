"""Remove calipers, measurement text and markers, fill them from the surrounding tissue.

The papers' method (DESIGN.md §3, step 2): convert RGB to HSV; annotations are drawn in saturated
colours (yellow, green, cyan calipers and read-outs) while B-mode tissue is grey, so pixels with
unusually high saturation — above an adaptive threshold, mean + k·std of the frame's saturation —
form the mask; it is dilated, then closed, and filled with OpenCV's Navier–Stokes inpainting,
radius 3.

Many scanners draw calipers and text in white or pale yellow instead, which saturation cannot see.
For those, :func:`bright_mark_mask` looks for *thin*, *flat*, *straight* bright strokes — what
scanner overlays are and tissue is not — and for chains of isolated dots (dotted caliper lines).
Bone, wide and bright, is its own background and never passes.

Only masked pixels change: the output is the input everywhere outside the returned mask, bit for
bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

Frame = NDArray[np.uint8]
Mask = NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class InpaintParams:
    """Thresholds and kernels; the papers fix the method and radius 3, the rest is ours.

    Attributes
    ----------
    saturation_k
        Threshold on HSV saturation (0–255) is ``mean + saturation_k · std`` over lit pixels...
    saturation_floor, saturation_ceiling
        ...clipped to this range: a grey frame (std ≈ 0) does not turn JPEG chroma noise into a
        mask, and a frame full of colour Doppler does not push the threshold past the calipers.
    value_floor
        Pixels darker than this (HSV value) are ignored: their hue and saturation are noise.
    colour_flow_min_area
        When set, solid coloured areas of at least this many pixels are colour-Doppler flow, not
        annotation, and are kept (the heart_view task reads them). ``None``: mask all colour.
    bright_marks
        Also detect white / pale-yellow strokes (:func:`bright_mark_mask`).
    bright_threshold
        Minimum brightness (max of R, G, B) of a stroke pixel.
    background_kernel, contrast
        A stroke is ``contrast`` brighter than the median over ``background_kernel`` pixels.
    max_stroke_width
        Anything thicker (an opening with a square one pixel wider keeps it) is not a stroke.
    run_length, run_tolerance
        A mark holds a horizontal or vertical run this long whose neighbours differ by at most
        ``run_tolerance`` grey levels.
    group_kernel, colour_tolerance, min_anchor_share
        Strokes closer than ``group_kernel`` form a group. Its runs must share one colour (at
        least ``min_anchor_share`` of their pixels); the group's strokes within
        ``colour_tolerance`` of that colour (each channel) are the mark.
    dot_max_pixels, dot_chain_kernel, dot_min_count, dot_min_extent
        Dotted lines: dots up to ``dot_max_pixels``, chained when closer than
        ``dot_chain_kernel``, at least ``dot_min_count`` of them over ``dot_min_extent`` pixels.
    dilate_kernel, close_kernel
        Square kernels of the dilation (covers anti-aliased and JPEG-smeared edges) and of the
        closing (joins the pieces of a glyph so the fill sees one hole).
    radius
        Inpainting radius (``cv2.inpaint``), 3 in the papers.
    """

    saturation_k: float = 3.0
    saturation_floor: int = 60
    saturation_ceiling: int = 128
    value_floor: int = 50
    colour_flow_min_area: int | None = None
    bright_marks: bool = True
    bright_threshold: int = 190
    background_kernel: int = 9
    contrast: int = 40
    max_stroke_width: int = 2
    run_length: int = 5
    run_tolerance: int = 4
    group_kernel: int = 5
    colour_tolerance: int = 12
    min_anchor_share: float = 0.5
    dot_max_pixels: int = 4
    dot_chain_kernel: int = 7
    dot_min_count: int = 4
    dot_min_extent: int = 20
    dilate_kernel: int = 3
    close_kernel: int = 5
    radius: int = 3

    def __post_init__(self) -> None:
        for name in (
            "background_kernel",
            "group_kernel",
            "dilate_kernel",
            "close_kernel",
            "radius",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected ≥ 1")
        if self.background_kernel % 2 == 0:
            raise ValueError(f"background_kernel={self.background_kernel}: expected an odd size")
        if not 0 <= self.saturation_floor <= self.saturation_ceiling <= 255:
            raise ValueError(
                f"saturation_floor={self.saturation_floor}, ceiling={self.saturation_ceiling}: "
                "expected 0 ≤ floor ≤ ceiling ≤ 255"
            )


def _as_rgb(frame: Frame) -> Frame:
    if frame.dtype != np.uint8 or frame.ndim not in (2, 3):
        raise ValueError(f"frame {frame.shape} {frame.dtype}: expected H×W[×3] uint8")
    if frame.ndim == 2:
        return np.repeat(frame[..., None], 3, axis=2)
    if frame.shape[2] != 3:
        raise ValueError(f"frame with {frame.shape[2]} channels: expected RGB")
    return frame


def saturation_threshold(hsv: NDArray[np.uint8], params: InpaintParams) -> float:
    """Adaptive saturation cut: ``mean + k·std`` over lit pixels, clipped to floor..ceiling."""
    lit = hsv[..., 2] >= params.value_floor
    s = hsv[..., 1][lit].astype(np.float32)
    if s.size == 0:
        return float(params.saturation_ceiling)
    cut = float(s.mean() + params.saturation_k * s.std())
    return float(np.clip(cut, params.saturation_floor, params.saturation_ceiling))


def colour_mask(frame: Frame, params: InpaintParams | None = None) -> Mask:
    """Pixels of unusually high saturation: coloured calipers, text and markers."""
    params = params or InpaintParams()
    rgb = _as_rgb(frame)
    hsv = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV), dtype=np.uint8)
    cut = saturation_threshold(hsv, params)
    mask = (hsv[..., 1] > cut) & (hsv[..., 2] >= params.value_floor)
    if params.colour_flow_min_area is not None and mask.any():
        mask &= ~_solid_areas(mask, params.colour_flow_min_area)
    result: Mask = mask
    return result


def _solid_areas(mask: Mask, min_area: int) -> Mask:
    """Connected coloured areas that are large *and* thick: colour-Doppler boxes, not strokes."""
    core = cv2.morphologyEx(
        mask.astype(np.uint8), cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (5, 5))
    )
    count, labels, stats, _ = cv2.connectedComponentsWithStats(core, connectivity=8)
    big = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= min_area)
    big = big[big > 0]
    solid = np.isin(labels, big)
    # Give the solid areas back the rim the opening shaved off, and nothing further.
    grown = cv2.dilate(solid.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_RECT, (5, 5)))
    result: Mask = (grown > 0) & mask
    return result


def bright_mark_mask(frame: Frame, params: InpaintParams | None = None) -> Mask:
    """Thin bright strokes (white or pale-yellow calipers, dotted lines, text) on grey tissue.

    Three cues, because each alone also fires on tissue: (1) a stroke is much brighter than the
    *median* of its neighbourhood (a median top-hat — a 1–2 pixel line does not move the median,
    while bone, a wide bright area, is its own background) and thinner than
    ``max_stroke_width + 1``; (2) a group of strokes is a mark only if it holds a straight run of
    ``run_length`` pixels of one flat value, as every caliper arm, tick and most glyphs do and
    speckle does not; (3) those runs must mostly share one exact colour, and only the group's
    strokes of that colour are kept, so a bright tissue echo touching a caliper stays. Dotted
    lines, whose dots are too short for runs, are chains of isolated dots (:func:`_dot_chains`).
    """
    params = params or InpaintParams()
    rgb = _as_rgb(frame)
    bright = rgb.max(axis=2)
    background = cv2.medianBlur(bright, params.background_kernel)
    contrast = bright.astype(np.int16) - background.astype(np.int16)
    candidate = ((bright >= params.bright_threshold) & (contrast >= params.contrast)).astype(
        np.uint8
    )
    width = params.max_stroke_width + 1
    thick = cv2.morphologyEx(candidate, cv2.MORPH_OPEN, _rect(width, width))
    strokes = candidate & (thick == 0)
    dots = _dot_chains(bright, params)
    if not strokes.any():
        return dots

    b = bright.astype(np.int16)
    # A run pixel equals its predecessor along the run and towers over what lies two steps
    # away across it — other strokes (a glyph's next bar) count as their background — so it is a
    # one- or two-pixel line, not the flat edge of saturated bone.
    padded = np.pad(np.where(strokes > 0, background.astype(np.int16), b), 2, mode="edge")
    across_v = np.maximum(padded[:-4, 2:-2], padded[4:, 2:-2])
    across_h = np.maximum(padded[2:-2, :-4], padded[2:-2, 4:])
    flat_h = np.zeros(strokes.shape, np.uint8)
    flat_h[:, 1:] = np.abs(np.diff(b, axis=1)) <= params.run_tolerance
    flat_h &= (b - across_v >= params.contrast).astype(np.uint8)
    flat_v = np.zeros(strokes.shape, np.uint8)
    flat_v[1:, :] = np.abs(np.diff(b, axis=0)) <= params.run_tolerance
    flat_v &= (b - across_h >= params.contrast).astype(np.uint8)
    n = params.run_length - 1  # flat_* marks a pixel equal to its predecessor
    runs = _open(strokes & flat_h, _rect(n, 1)) | _open(strokes & flat_v, _rect(1, n))
    grouped = cv2.dilate(strokes, _rect(params.group_kernel, params.group_kernel))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(grouped, connectivity=8)
    on = strokes > 0
    marks = np.zeros(on.shape, bool)
    anchored = runs > 0
    anchor_groups = labels[anchored]
    anchor_colours = rgb[anchored].astype(np.int16)
    for group in np.unique(anchor_groups):
        values, counts = np.unique(
            anchor_colours[anchor_groups == group], axis=0, return_counts=True
        )
        if counts.max() < params.min_anchor_share * counts.sum():
            continue  # an overlay is drawn in one colour; speckle that happens to run is not
        mode = values[np.argmax(counts)]
        x, y, w, h = (int(v) for v in stats[group, :4])
        window = (slice(y, y + h), slice(x, x + w))
        near = np.abs(rgb[window].astype(np.int16) - mode).max(axis=2) <= params.colour_tolerance
        marks[window] |= (labels[window] == group) & on[window] & near
    result: Mask = marks | dots
    return result


def _dot_chains(bright: NDArray[np.uint8], params: InpaintParams) -> Mask:
    """Dotted lines: ``dot_min_count`` or more isolated bright dots chained over a distance.

    A dot is at most ``dot_max_pixels`` pixels, brighter by ``contrast`` than every pixel two
    steps away — speckle next to bone or bright tissue never is, and lone bright grains in soft
    tissue seldom come in chains.
    """
    ring = np.ones((5, 5), np.uint8)
    ring[1:4, 1:4] = 0
    surround = cv2.dilate(bright, ring)
    isolated = (
        (bright >= params.bright_threshold)
        & (bright.astype(np.int16) - surround.astype(np.int16) >= params.contrast)
    ).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(isolated, connectivity=8)
    if count <= 1:
        return np.zeros(bright.shape, bool)
    small = stats[:, cv2.CC_STAT_AREA] <= params.dot_max_pixels
    small[0] = False
    dot = small[labels]
    k = params.dot_chain_kernel
    chains = cv2.dilate(dot.astype(np.uint8), _rect(k, k))
    n_chains, chain_labels, chain_stats, _ = cv2.connectedComponentsWithStats(
        chains, connectivity=8
    )
    per_chain = np.bincount(
        np.unique(chain_labels[dot] * count + labels[dot]) // count, minlength=n_chains
    )
    extent = np.maximum(chain_stats[:, cv2.CC_STAT_WIDTH], chain_stats[:, cv2.CC_STAT_HEIGHT]) - (
        k - 1
    )
    keep = (per_chain >= params.dot_min_count) & (extent >= params.dot_min_extent)
    keep[0] = False
    result: Mask = keep[chain_labels] & dot
    return result


def _open(mask: NDArray[np.uint8], kernel: NDArray[np.uint8]) -> NDArray[np.uint8]:
    return np.asarray(cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel), dtype=np.uint8)


def _rect(width: int, height: int) -> NDArray[np.uint8]:
    return np.asarray(cv2.getStructuringElement(cv2.MORPH_RECT, (width, height)), dtype=np.uint8)


def annotation_mask(frame: Frame, params: InpaintParams | None = None) -> Mask:
    """Where annotations are: colour and bright-stroke detections, dilated, then closed.

    This is exactly the set of pixels :func:`inpaint` replaces.
    """
    params = params or InpaintParams()
    raw = colour_mask(frame, params)
    if params.bright_marks:
        raw = raw | bright_mark_mask(frame, params)
    mask = raw.astype(np.uint8)
    if params.dilate_kernel > 1:
        mask = np.asarray(cv2.dilate(mask, _rect(params.dilate_kernel, params.dilate_kernel)))
    if params.close_kernel > 1:
        square = _rect(params.close_kernel, params.close_kernel)
        mask = np.asarray(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, square))
    result: Mask = mask > 0
    return result


def inpaint(frame: Frame, params: InpaintParams | None = None) -> tuple[Frame, Mask]:
    """Fill annotations from the surrounding tissue (Navier–Stokes); return frame and mask.

    Parameters
    ----------
    frame
        H×W×3 RGB (or H×W grey) uint8, after scrub.
    params
        Detection thresholds, kernels and the inpainting radius.

    Returns
    -------
    frame, mask
        A new frame of the input's shape, equal to the input wherever ``mask`` is False.
    """
    params = params or InpaintParams()
    mask = annotation_mask(frame, params)
    out = frame.copy()
    if not mask.any():
        return out, mask
    filled = cv2.inpaint(
        np.ascontiguousarray(frame), mask.astype(np.uint8), params.radius, cv2.INPAINT_NS
    )
    out[mask] = filled[mask]
    return out, mask
