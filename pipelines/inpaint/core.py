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

Frames that went through lossy compression (``lossy=True``, from the frame's transfer syntax or
Lossy Image Compression flag) no longer draw a stroke in one exact colour: JPEG at quality 95
spreads a 235-grey glyph over ~229–241 and 4:2:2 chroma subsampling halves the chroma of vertical
strokes, so the exact-colour group rule loses every white read-out and depth tick (40–60 % of a
phantom's marks). With ``InpaintParams.lossy_tolerance`` set, such frames' strokes are grouped by
one *brightness* within that tolerance instead. Growing the mask over JPEG's ringing halo was
tried and rejected: Navier–Stokes cannot rebuild speckle, so filling one more ring costs more
(PSNR vs the clean phantom 23.9 → 21.6 dB there) than the halo it removes.

Only masked pixels change: the output is the input everywhere outside the returned mask, bit for
bit.

Speed (issue 3 asks ≥ 100 frames/s per core for decode + scrub + inpaint + preprocess): one HSV
conversion feeds both detectors (OpenCV's 8-bit V is max(R, G, B), the brightness the stroke
detector needs); per-pixel rules run as uint8 OpenCV operations or on the few pixels they
concern; the stroke detector's median background is tested exactly but only at bright pixels
(:mod:`pipelines.inpaint.median`, ~20× cheaper than a whole-frame 9×9 median); the run tests
look at the stroke pixels only, and dotted lines are chained from the coordinates of the few
isolated pixels (tens per frame) rather than by labelling the frame; the later steps work on
the indices of the pixels bright enough to matter (~2 % of a frame) rather than on whole-frame
planes, each setting its marks in one shared plane; and the fill works on
crops around the mask (:mod:`pipelines.inpaint.fill`). The mask and the fill are bit-identical to
computing every step on the whole frame (tested against that reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from pipelines.inpaint.calipers import caliper_crosses
from pipelines.inpaint.fill import fill_navier_stokes
from pipelines.inpaint.median import LocalMedian, brighter_than_median

Frame = NDArray[np.uint8]
Mask = NDArray[np.bool_]
#: One 8-bit plane; masks of this type hold 0 and 1.
Plane = NDArray[np.uint8]


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
        A stroke is ``contrast`` brighter than the median over a ``background_kernel`` square.
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
        Inpainting radius (``cv2.inpaint``, Navier–Stokes), 3 in the papers.
    lossy_tolerance
        On frames that went through lossy compression (``lossy=True``: a JPEG transfer syntax
        or Lossy Image Compression "01"), a stroke's pixels are no longer one exact colour:
        JPEG q95 spreads a 235-grey glyph over 229–241 and halves the chroma of vertical
        strokes. Runs then allow neighbours this far apart (instead of ``run_tolerance``), and
        a group's runs must share one *brightness* within ± this (at least
        ``min_anchor_share`` of them), its strokes within ± this of it being the mark.
        Default 6, which suits quality ≥ 95. ``None``: the exact rules also on lossy frames
        (the behaviour before this setting, which model files that predate it keep: see
        :func:`pipelines.models.modelfile.parse_inpaint`); on JPEG they lose most white text
        and ticks.
    caliper_arm
        Also find caliper crosses by their shape (:mod:`pipelines.inpaint.calipers`): a '+' of
        arms at least this long either side of the centre, at most ``max_stroke_width`` thick,
        every pixel at least ``bright_threshold`` and of one level (within ``lossy_tolerance``
        on lossy frames). This finds crosses on bright bone, where the stroke rules' median
        test cannot (phantom skull calipers: grey-style recall 0.96 → ≥ 0.99). ``None``: no
        cross rule (the behaviour before this setting, which model files that predate it keep).
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
    lossy_tolerance: int | None = 6
    caliper_arm: int | None = 4

    def __post_init__(self) -> None:
        for name in (
            "background_kernel",
            "group_kernel",
            "dilate_kernel",
            "close_kernel",
            "radius",
            "contrast",
            "max_stroke_width",
            "dot_max_pixels",
            "dot_min_count",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected ≥ 1")
        if self.dot_chain_kernel < 3:
            raise ValueError(f"dot_chain_kernel={self.dot_chain_kernel}: expected ≥ 3")
        if self.background_kernel % 2 == 0:
            raise ValueError(f"background_kernel={self.background_kernel}: expected an odd size")
        if self.run_length < 2:
            raise ValueError(f"run_length={self.run_length}: expected ≥ 2")
        if self.radius > 100:
            raise ValueError(f"radius={self.radius}: OpenCV caps the inpainting radius at 100")
        for name in ("saturation_floor", "saturation_ceiling", "value_floor", "bright_threshold"):
            if not 0 <= getattr(self, name) <= 255:
                raise ValueError(f"{name}={getattr(self, name)}: expected 0..255")
        if not 0 <= self.saturation_floor <= self.saturation_ceiling <= 255:
            raise ValueError(
                f"saturation_floor={self.saturation_floor}, ceiling={self.saturation_ceiling}: "
                "expected 0 ≤ floor ≤ ceiling ≤ 255"
            )
        if self.caliper_arm is not None and not self.max_stroke_width <= self.caliper_arm <= 50:
            raise ValueError(
                f"caliper_arm={self.caliper_arm}: expected max_stroke_width "
                f"({self.max_stroke_width})..50 or None"
            )
        if self.lossy_tolerance is not None and not 0 <= self.lossy_tolerance <= 255:
            raise ValueError(f"lossy_tolerance={self.lossy_tolerance}: expected 0..255 or None")
        if self.colour_flow_min_area is not None and self.colour_flow_min_area < 1:
            raise ValueError(
                f"colour_flow_min_area={self.colour_flow_min_area}: expected ≥ 1 or None"
            )


def _as_rgb(frame: Frame) -> Frame:
    if frame.dtype != np.uint8 or frame.ndim not in (2, 3):
        raise ValueError(f"frame {frame.shape} {frame.dtype}: expected H×W[×3] uint8")
    if frame.ndim == 2:
        return np.asarray(cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_GRAY2RGB))
    if frame.shape[2] != 3:
        raise ValueError(f"frame with {frame.shape[2]} channels: expected RGB")
    return np.ascontiguousarray(frame)


def _saturation_value(rgb: Frame) -> tuple[Plane, Plane]:
    """Saturation and value planes of OpenCV's 8-bit HSV; value is max(R, G, B)."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    return np.asarray(cv2.extractChannel(hsv, 1)), np.asarray(cv2.extractChannel(hsv, 2))


def saturation_threshold(saturation: Plane, value: Plane, params: InpaintParams) -> float:
    """Adaptive saturation cut: ``mean + k·std`` over lit pixels, clipped to floor..ceiling."""
    lit = (value >= params.value_floor).view(np.uint8)
    n = cv2.countNonZero(lit)
    if not n:
        return float(params.saturation_ceiling)
    # Moments over the lit pixels from whole-plane moments of the plane with the rest zeroed:
    # OpenCV's masked meanStdDev is ~15x slower.
    mean_all, std_all = cv2.meanStdDev(cv2.bitwise_and(saturation, saturation, mask=lit))
    total = saturation.size
    mean = float(mean_all[0, 0]) * total / n
    square = (float(std_all[0, 0]) ** 2 + float(mean_all[0, 0]) ** 2) * total / n
    cut = mean + params.saturation_k * float(np.sqrt(max(square - mean * mean, 0.0)))
    return float(np.clip(cut, params.saturation_floor, params.saturation_ceiling))


def colour_mask(frame: Frame, params: InpaintParams | None = None) -> Mask:
    """Pixels of unusually high saturation: coloured calipers, text and markers."""
    params = params or InpaintParams()
    saturation, value = _saturation_value(_as_rgb(frame))
    result: Mask = _colour(saturation, value, params).view(bool)
    return result


def _colour(saturation: Plane, value: Plane, params: InpaintParams) -> Plane:
    # The cut is never below the floor: a frame with no saturation above it (grey B-mode, JPEG
    # chroma noise) has no colour marks, and the frame-wide statistics need not be taken.
    if int(saturation.max(initial=0)) <= params.saturation_floor:
        return np.zeros(saturation.shape, np.uint8)
    cut = saturation_threshold(saturation, value, params)
    mask = ((saturation > cut) & (value >= params.value_floor)).view(np.uint8)
    if params.colour_flow_min_area is not None and cv2.countNonZero(mask):
        mask &= _solid_areas(mask, params.colour_flow_min_area) == 0
    return mask


def _solid_areas(mask: Plane, min_area: int) -> Plane:
    """Connected coloured areas that are large *and* thick: colour-Doppler boxes, not strokes."""
    core = _open(mask, _rect(5, 5))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(core, connectivity=8)
    big = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= min_area)
    big = big[big > 0]
    solid = np.isin(labels, big).view(np.uint8)
    # Give the solid areas back the rim the opening shaved off, and nothing further.
    grown = _dilate(solid, _rect(5, 5))
    result: Plane = grown & mask
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
    _, value = _saturation_value(rgb)
    result: Mask = _bright(rgb, value, params).view(bool)
    return result


def _bright(
    rgb: Frame, bright: Plane, params: InpaintParams, lossy: bool = False, out: Plane | None = None
) -> Plane:
    """:func:`bright_mark_mask` of the frame's value plane, set to 1 in ``out`` (new if None)."""
    out = np.zeros(bright.shape, np.uint8) if out is None else out
    # JPEG leaves no two pixels of a stroke exactly alike: lossy frames get tolerant runs and
    # groups (see ``InpaintParams.lossy_tolerance``); ``None`` keeps the exact rules.
    jpeg_tolerance = params.lossy_tolerance if lossy else None
    # Every later test concerns pixels at least this bright (~2 % of a frame): their indices
    # once, then per-pixel tests on them rather than whole-frame planes.
    hot = np.flatnonzero(bright >= params.bright_threshold)
    _dot_chains_into(out, bright, params, hot)
    if not hot.size:
        return out
    local = LocalMedian(bright, params.background_kernel)
    candidate = brighter_than_median(
        bright, params.bright_threshold, params.contrast, params.background_kernel, local, hot
    )
    width = params.max_stroke_width + 1
    # candidate & ~opening (0/1 planes; OpenCV's opening by an even square is not within its
    # input, hence the saturating subtraction rather than a plain difference).
    strokes = np.asarray(cv2.subtract(candidate, _open(candidate, _rect(width, width))), np.uint8)
    on = strokes.view(bool)
    where = np.flatnonzero(on)
    if not where.size:
        return out

    # A run pixel equals its predecessor along the run and towers over what lies two steps
    # away across it — other strokes (a glyph's next bar) count as their background — so it is a
    # one- or two-pixel line, not the flat edge of saturated bone. Both are tested at the stroke
    # pixels only (~0.5 % of the frame), not as whole-frame planes.
    run_tolerance = params.run_tolerance if jpeg_tolerance is None else jpeg_tolerance
    ys, xs = np.divmod(where, bright.shape[1])
    plane = bright.reshape(-1)
    here = plane[where].astype(np.int16)
    # Equal to the left / upper neighbour (indices wrapping at the edge are never used).
    flat_h = (xs > 0) & (np.abs(here - plane[where - 1]) <= run_tolerance)
    flat_v = (ys > 0) & (np.abs(here - plane[where - bright.shape[1]]) <= run_tolerance)
    n = params.run_length - 1  # flat_* marks a pixel equal to its predecessor
    across_h = _towering_at(where[flat_h], on, local, params.contrast, axis=0)
    across_v = _towering_at(where[flat_v], on, local, params.contrast, axis=1)
    runs = _sorted_unique(
        np.concatenate(
            (
                _open_line(across_h, bright.shape, n, axis=1),
                _open_line(across_v, bright.shape, n, axis=0),
            )
        )
    )
    if not runs.size:
        return out

    grouped = _dilate(strokes, _rect(params.group_kernel, params.group_kernel))
    labels, stats = _anchored_groups_at(grouped, runs)
    # Each group's pixels all lie in its box, so "a stroke of the group, near its colour" is
    # tested per stroke pixel against its own group's colour, with no loop over the groups.
    group = labels.reshape(-1)[where].astype(np.intp)
    kept = np.zeros(len(stats), bool)
    if jpeg_tolerance is not None:
        # One brightness, not one colour: 4:2:2 subsampling halves the chroma of vertical
        # strokes (a pale-yellow caliper's blue channel goes from 170 to ~215 on its upright).
        share = params.min_anchor_share
        level = np.zeros(len(stats), np.int16)
        for found, brightness in _group_levels_at(bright, labels, runs, jpeg_tolerance, share):
            kept[found], level[found] = True, brightness
        near = np.abs(here - level[group]) <= jpeg_tolerance
    else:
        mode = np.zeros((len(stats), 3), np.int16)
        for found, colour in _group_colours(rgb, labels, runs, params.min_anchor_share):
            kept[found], mode[found] = True, colour
        pixels = rgb.reshape(-1, 3)[where].astype(np.int16)
        # Within tolerance of the mode in every channel.
        near = (np.abs(pixels - mode[group]) <= params.colour_tolerance).all(axis=1)
    out.reshape(-1)[where[kept[group] & near]] = 1
    return out


def _open_line(
    where: NDArray[np.intp], shape: tuple[int, ...], length: int, *, axis: int
) -> NDArray[np.intp]:
    """``cv2.morphologyEx(MORPH_OPEN)`` of the pixels at ``where`` by a line, as flat indices.

    The line is ``length`` pixels along ``axis`` (1: a row, ``_rect(length, 1)``; 0: a column),
    with OpenCV's anchor ``length // 2`` and default border (outside the frame counts as set for
    the erosion, unset for the dilation). Computed per maximal run of ``where`` along the axis:
    a run from ``a`` to ``b`` erodes to the anchors ``p`` whose window ``p - anchor`` ..
    ``p - anchor + length - 1``, clipped to the frame, lies in the run; the dilation spreads each
    to ``p + anchor - length + 1`` .. ``p + anchor``. For an even ``length`` that is one pixel
    after the window, so the result may leave the input (OpenCV's kernel is not reflected).
    """
    height, width = shape[:2]
    if not where.size:
        return where
    if axis == 1:
        line, pos = np.divmod(np.sort(where), width)
        size = width
    else:
        rows, columns = np.divmod(where, width)
        line, pos = np.divmod(np.sort(columns * height + rows), height)  # column by column
        size = height
    breaks = np.flatnonzero((np.diff(pos) != 1) | (np.diff(line) != 0)) + 1
    starts = np.concatenate(([0], breaks))
    lasts = np.concatenate((breaks, [pos.size])) - 1
    first, last, line = pos[starts], pos[lasts], line[starts]
    anchor = length // 2
    lowest = np.where(first == 0, 0, first + anchor)
    highest = np.where(last == size - 1, size - 1, last - length + 1 + anchor)
    lowest, highest = np.maximum(lowest, 0), np.minimum(highest, size - 1)
    kept = lowest <= highest
    low = np.maximum(lowest[kept] + anchor - length + 1, 0)
    high = np.minimum(highest[kept] + anchor, size - 1)
    count = high - low + 1
    step = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    along, across = np.repeat(low, count) + step, np.repeat(line[kept], count)
    flat = across * width + along if axis == 1 else along * width + across
    return _sorted_unique(flat)


def _sorted_unique(values: NDArray[np.intp]) -> NDArray[np.intp]:
    """``np.unique`` of a 1-D integer array, by one sort: numpy's own costs ~10× more here."""
    ordered = np.sort(values)
    first = np.ones(ordered.size, bool)
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    result: NDArray[np.intp] = ordered[first]
    return result


def _crosses(
    bright: Plane, arm: int, params: InpaintParams, lossy: bool, out: Plane | None = None
) -> Plane:
    """Caliper crosses (:func:`caliper_crosses`), one exact level unless the frame is lossy."""
    jpeg_tolerance = params.lossy_tolerance if lossy else None
    tolerance = 0 if jpeg_tolerance is None else jpeg_tolerance
    return caliper_crosses(
        bright, arm, params.bright_threshold, params.max_stroke_width, tolerance, out=out
    )


def _towering(
    pixels: Mask, strokes: Mask, local: LocalMedian, contrast: int, *, axis: int
) -> Plane:
    """Those of ``pixels`` at least ``contrast`` above both pixels two steps away along ``axis``.

    A neighbour that is itself a stroke counts as its background (the median of its window), a
    neighbour beyond the frame as the frame's edge pixel. Strokes stand ``contrast`` above their
    median, so a stroke neighbour no brighter than the pixel passes without counting its window.
    """
    return _scatter(
        _towering_at(np.flatnonzero(pixels), strokes, local, contrast, axis=axis), pixels.shape
    )


def _scatter(where: NDArray[np.intp], shape: tuple[int, ...]) -> Plane:
    """A 0/1 plane with ones at the flat indices ``where``."""
    out = np.zeros(shape[:2], np.uint8)
    out.reshape(-1)[where] = 1
    return out


def _towering_at(
    where: NDArray[np.intp], strokes: Mask, local: LocalMedian, contrast: int, *, axis: int
) -> NDArray[np.intp]:
    """:func:`_towering` of the pixels at the flat indices ``where``: those that pass."""
    bright = local.plane
    height, width = bright.shape
    ys, xs = np.divmod(where, width)
    level = bright.reshape(-1)[where].astype(np.int16) - contrast
    keep = np.ones(where.size, bool)
    for step in (-2, 2):
        if axis == 0:
            neighbour = np.clip(ys + step, 0, height - 1) * width + xs
        else:
            neighbour = ys * width + np.clip(xs + step, 0, width - 1)
        value = bright.reshape(-1)[neighbour].astype(np.int16)
        is_stroke = strokes.reshape(-1)[neighbour]
        keep &= np.where(is_stroke, True, value <= level)
        hard = np.flatnonzero(keep & is_stroke & (value > level + contrast))
        if hard.size:
            keep[hard] = local.at_most(neighbour[hard], level[hard])
    result: NDArray[np.intp] = where[keep]
    return result


def _anchored_groups(grouped: Plane, runs: Plane) -> tuple[NDArray[np.integer], NDArray[np.int32]]:
    """Labels and stats (as ``cv2.connectedComponentsWithStats``) of the groups holding a run.

    Only groups with a run can be marks, and they are few: each is flood-filled from one of its
    run pixels (8-connected, like the labelling), which costs its own area rather than the frame's.
    Groups without a run keep the value 1 and no stats. Past 253 such groups, all are labelled.
    """
    return _anchored_groups_at(grouped.copy(), np.flatnonzero(runs.view(bool)))


def _anchored_groups_at(
    grouped: Plane, seeds: NDArray[np.intp]
) -> tuple[NDArray[np.integer], NDArray[np.int32]]:
    """:func:`_anchored_groups` of the run pixels at the sorted flat indices ``seeds``.

    Labels ``grouped`` (0/1) in place: it becomes the returned labels unless all are labelled.
    """
    labels = grouped  # 0 background, 1 not yet labelled, 2.. labels
    stats = [np.zeros(5, np.int32), np.zeros(5, np.int32)]
    flags = 8 | cv2.FLOODFILL_FIXED_RANGE
    flat = labels.reshape(-1)
    # One scratch mask for every fill: OpenCV would otherwise allocate a frame-sized one per call.
    scratch = np.zeros((grouped.shape[0] + 2, grouped.shape[1] + 2), np.uint8)
    while seeds.size:
        label = len(stats)
        if label > 255:
            _, all_labels, all_stats = _components(labels)  # labelled or not, the groups' pixels
            return all_labels, all_stats
        y, x = divmod(int(seeds[0]), grouped.shape[1])
        area, _, _, rect = cv2.floodFill(labels, scratch, (x, y), label, 0, 0, flags)
        stats.append(np.array([*rect, area], np.int32))
        seeds = seeds[flat[seeds] == 1]  # run pixels of groups not labelled yet
    return labels, np.stack(stats)


def _group_levels(
    bright: Plane, labels: NDArray[np.integer], runs: Plane, tolerance: int, min_share: float
) -> list[tuple[int, int]]:
    """Groups whose run pixels mostly lie within ``tolerance`` of one brightness, with it.

    The lossy frames' counterpart of :func:`_group_colours`: per group, the brightness whose
    ±``tolerance`` window holds most run pixels (the lowest among equals), kept when that window
    holds at least ``min_share`` of them.
    """
    return _group_levels_at(bright, labels, np.flatnonzero(runs.view(bool)), tolerance, min_share)


def _group_levels_at(
    bright: Plane,
    labels: NDArray[np.integer],
    anchors: NDArray[np.intp],
    tolerance: int,
    min_share: float,
) -> list[tuple[int, int]]:
    """:func:`_group_levels` of the run pixels at the flat indices ``anchors``."""
    groups = labels.reshape(-1)[anchors].astype(np.int64)
    # np.unique(groups, return_inverse=True) by counting: labels are small.
    present = np.flatnonzero(np.bincount(groups))
    rank = np.zeros(int(present[-1]) + 1 if present.size else 0, np.int64)
    rank[present] = np.arange(present.size)
    index = rank[groups]
    levels = bright.reshape(-1)[anchors].astype(np.int64)
    histogram = np.bincount(index * 256 + levels, minlength=present.size * 256).reshape(-1, 256)
    padded = np.zeros((present.size, 256 + 2 * tolerance), np.int64)
    padded[:, tolerance : tolerance + 256] = histogram
    cumulative = np.zeros((present.size, 257 + 2 * tolerance), np.int64)
    cumulative[:, 1:] = np.cumsum(padded, axis=1)
    # window[:, c] = run pixels of brightness c - tolerance .. c + tolerance
    window = cumulative[:, 2 * tolerance + 1 :] - cumulative[:, :256]
    best = np.argmax(window, axis=1)
    share = window[np.arange(present.size), best]
    totals = histogram.sum(axis=1)
    keep = share >= min_share * totals
    return [(int(g), int(b)) for g, b in zip(present[keep], best[keep], strict=True)]


def _group_colours(
    rgb: Frame, labels: NDArray[np.integer], anchors: NDArray[np.intp], min_share: float
) -> list[tuple[int, NDArray[np.int16]]]:
    """Groups whose run pixels (at the flat indices ``anchors``) mostly share one colour, with it.

    An overlay is drawn in one colour; speckle that happens to form a run is not. The colour is
    the mode; ties go to the smallest colour in (R, G, B) order.
    """
    groups = labels.reshape(-1)[anchors].astype(np.int64)
    pixels = rgb.reshape(-1, 3)[anchors].astype(np.int64)
    codes = (pixels[:, 0] << 16) | (pixels[:, 1] << 8) | pixels[:, 2]
    ordered = np.sort((groups << 24) | codes)
    # np.unique(..., return_counts=True) by one sort: numpy's own costs ~10× more here.
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    keys, counts = ordered[starts], np.diff(np.append(starts, ordered.size))
    key_groups, key_codes = keys >> 24, keys & 0xFFFFFF
    totals = np.bincount(key_groups, weights=counts)
    # Per group: most frequent colour first, smallest colour among equals.
    order = np.lexsort((key_codes, -counts, key_groups))
    first = order[np.r_[True, np.diff(key_groups[order]) != 0]]
    found = []
    for index in first:
        group = int(key_groups[index])
        if counts[index] >= min_share * totals[group]:
            code = int(key_codes[index])
            mode = np.array([code >> 16, (code >> 8) & 0xFF, code & 0xFF], np.int16)
            found.append((group, mode))
    return found


def _components(mask: Plane) -> tuple[int, NDArray[np.integer], NDArray[np.int32]]:
    """8-connected components with stats; 16-bit labels (~2× faster) unless they overflow."""
    try:
        count, labels, stats, _ = cv2.connectedComponentsWithStats(
            mask, connectivity=8, ltype=cv2.CV_16U
        )
    except cv2.error:  # more than 65534 labels: OpenCV refuses rather than wraps
        count, labels, stats, _ = cv2.connectedComponentsWithStats(
            mask, connectivity=8, ltype=cv2.CV_32S
        )
    return int(count), np.asarray(labels), np.asarray(stats, dtype=np.int32)


def _dot_chains(bright: Plane, params: InpaintParams, *, by_components: bool = False) -> Plane:
    """Dotted lines: ``dot_min_count`` or more isolated bright dots chained over a distance.

    A dot is at most ``dot_max_pixels`` pixels, brighter by ``contrast`` than every pixel two
    steps away — speckle next to bone or bright tissue never is, and lone bright grains in soft
    tissue seldom come in chains. ``by_components`` takes the general route (label the frame)
    even where the shortcut (:func:`_pairwise_dot_chains`) gives the same answer; the tests
    compare the two.
    """
    out = np.zeros(bright.shape, np.uint8)
    hot = np.flatnonzero(bright >= params.bright_threshold)
    _dot_chains_into(out, bright, params, hot, by_components=by_components)
    return out


def _dot_chains_into(
    out: Plane,
    bright: Plane,
    params: InpaintParams,
    hot: NDArray[np.intp],
    *,
    by_components: bool = False,
) -> None:
    """:func:`_dot_chains`, set to 1 in ``out``; ``hot``: flat indices of ``bright_threshold``."""
    if not hot.size:
        return
    ring = np.ones((5, 5), np.uint8)
    ring[1:4, 1:4] = 0
    surround = cv2.dilate(bright, ring).reshape(-1)
    level = bright.reshape(-1)[hot].astype(np.int16)
    where = hot[level - surround[hot] >= params.contrast]  # contrast ≥ 1: no saturation needed
    if not where.size:
        return
    if params.dot_max_pixels >= 4 and not by_components and where.size <= _PAIRWISE_DOTS:
        out.reshape(-1)[_pairwise_dot_chains(where, bright.shape, params)] = 1
        return
    k = params.dot_chain_kernel
    _, labels, stats = _components(_scatter(where, bright.shape))
    small = stats[:, cv2.CC_STAT_AREA] <= params.dot_max_pixels
    small[0] = False
    if np.count_nonzero(small) < params.dot_min_count:
        return
    dot = small[labels].view(np.uint8)
    n_chains, chain_labels, chain_stats = _components(_dilate(dot, _rect(k, k)))
    corners = stats[small, :2]  # a dot's box corner lies in the chain grown around it
    dot_chains = chain_labels[corners[:, 1], corners[:, 0]]
    per_chain = np.bincount(dot_chains.astype(np.int64), minlength=n_chains)
    extent = np.maximum(chain_stats[:, cv2.CC_STAT_WIDTH], chain_stats[:, cv2.CC_STAT_HEIGHT]) - (
        k - 1
    )
    keep = (per_chain >= params.dot_min_count) & (extent >= params.dot_min_extent)
    keep[0] = False
    for chain in np.flatnonzero(keep):
        x, y, w, h = (int(v) for v in chain_stats[chain, :4])
        window = (slice(y, y + h), slice(x, x + w))
        out[window] |= (chain_labels[window] == chain) & (dot[window] > 0)


#: Up to this many isolated pixels, dot chains come from comparing every pair of them (a frame
#: has tens: ~0.5 ms instead of ~1.8 ms for labelling 800×600); past it, from labelling the frame.
_PAIRWISE_DOTS = 512


def _pairwise_dot_chains(
    where: NDArray[np.intp], shape: tuple[int, ...], params: InpaintParams
) -> NDArray[np.intp]:
    """:func:`_dot_chains` from the flat indices of the isolated pixels (``dot_max_pixels`` ≥ 4):
    the flat indices of the chained ones.

    Two isolated pixels two steps apart would each have to out-shine the other, so every
    component of isolated pixels fits in 2×2: all are dots, each counted once at its first pixel
    in raster order (no isolated W, NW, N or NE neighbour). The k×k squares the chaining dilation
    grows around two pixels touch (8-connected) exactly when the pixels lie within k of each
    other along both axes — at the frame's border too, where the squares are clipped — so chains
    are the components of that relation, and their boxes those of the clipped squares.
    """
    height, width = shape[:2]
    ys, xs = np.divmod(where.astype(np.int64), width)
    dy = ys[:, None] - ys[None, :]
    dx = xs[:, None] - xs[None, :]
    earlier = ((dy == 0) & (dx == 1)) | ((dy == 1) & (np.abs(dx) <= 1))
    firsts = ~earlier.any(axis=1)
    k = params.dot_chain_kernel
    linked = (np.abs(dy) <= k) & (np.abs(dx) <= k)
    # Each pixel takes the smallest index it is linked to, then that pixel's: at the fixed
    # point every chain carries the smallest index among its pixels.
    chain = np.arange(where.size)
    while True:
        smallest = np.where(linked, chain[None, :], where.size).min(axis=1)
        smallest = smallest[smallest]
        if np.array_equal(smallest, chain):
            break
        chain = smallest
    # np.unique(chain, return_inverse=True) by counting: chains are named by pixel indices.
    present = np.zeros(where.size, bool)
    present[chain] = True
    chain = (np.cumsum(present) - 1)[chain]
    n_chains = int(chain.max()) + 1
    per_chain = np.bincount(chain, weights=firsts, minlength=n_chains)
    # OpenCV anchors an even kernel's square k // 2 after its pixel, k - 1 - k // 2 before it.
    after, before = k // 2, k - 1 - k // 2

    def span(coords: NDArray[np.int64], size: int) -> NDArray[np.int64]:
        low = np.full(n_chains, size, np.int64)
        high = np.full(n_chains, -1, np.int64)
        np.minimum.at(low, chain, coords)
        np.maximum.at(high, chain, coords)
        result: NDArray[np.int64] = (
            np.minimum(high + after, size - 1) - np.maximum(low - before, 0) + 1
        )
        return result

    extent = np.maximum(span(xs, width), span(ys, height)) - (k - 1)
    keep = (per_chain >= params.dot_min_count) & (extent >= params.dot_min_extent)
    result: NDArray[np.intp] = where[keep[chain]]
    return result


def _dilate(mask: Plane, kernel: Plane) -> Plane:
    return np.asarray(cv2.dilate(mask, kernel), dtype=np.uint8)


def _open(mask: Plane, kernel: Plane) -> Plane:
    return np.asarray(cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel), dtype=np.uint8)


def _rect(width: int, height: int) -> Plane:
    return np.asarray(cv2.getStructuringElement(cv2.MORPH_RECT, (width, height)), dtype=np.uint8)


def annotation_mask(
    frame: Frame, params: InpaintParams | None = None, *, lossy: bool = False
) -> Mask:
    """Where annotations are: colour and bright-stroke detections, dilated, then closed.

    This is exactly the set of pixels :func:`inpaint` replaces. ``lossy``: the frame went
    through lossy compression (``FrameMeta.lossy``), see ``InpaintParams.lossy_tolerance``.
    """
    params = params or InpaintParams()
    return _annotation_mask(_as_rgb(frame), params, lossy)


def _annotation_mask(rgb: Frame, params: InpaintParams, lossy: bool = False) -> Mask:
    saturation, value = _saturation_value(rgb)
    raw = _colour(saturation, value, params)  # the detectors below set their marks in it
    if params.bright_marks:
        _bright(rgb, value, params, lossy, out=raw)
        if params.caliper_arm is not None:
            _crosses(value, params.caliper_arm, params, lossy, out=raw)
    mask = raw
    dilate, close = params.dilate_kernel, params.close_kernel
    if dilate > 1 and close > 1 and dilate % 2 and close % 2:
        # Dilating by d then closing by c (dilate, erode) is dilating by d + c - 1, then
        # eroding by c — also at the frame's border for these centred squares: one pass less.
        mask = np.asarray(cv2.dilate(mask, _rect(dilate + close - 1, dilate + close - 1)))
        mask = np.asarray(cv2.erode(mask, _rect(close, close), dst=raw))
    else:
        if dilate > 1:
            mask = np.asarray(cv2.dilate(mask, _rect(dilate, dilate)))
        if close > 1:
            mask = np.asarray(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _rect(close, close)))
    result: Mask = mask.view(bool)
    return result


def inpaint(
    frame: Frame, params: InpaintParams | None = None, *, lossy: bool = False
) -> tuple[Frame, Mask]:
    """Fill annotations from the surrounding tissue (Navier–Stokes); return frame and mask.

    Parameters
    ----------
    frame
        H×W×3 RGB (or H×W grey) uint8, after scrub.
    params
        Detection thresholds, kernels and the inpainting radius.
    lossy
        The frame went through lossy compression (``FrameMeta.lossy``): stroke detection
        tolerates JPEG's noise when ``params.lossy_tolerance`` is set.

    Returns
    -------
    frame, mask
        A new frame of the input's shape, equal to the input wherever ``mask`` is False.
    """
    params = params or InpaintParams()
    rgb = _as_rgb(frame)
    mask = _annotation_mask(rgb, params, lossy)
    if frame.ndim == 2:
        return fill_navier_stokes(np.ascontiguousarray(frame), mask, params.radius), mask
    return fill_navier_stokes(rgb, mask, params.radius), mask
