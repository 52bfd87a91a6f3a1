"""Blank the burned-in patient strip above the ultrasound image (DESIGN.md §3, step 1).

Scanners print the patient's name, ID and the date in a strip across the top of the screen, above
the sector. Where the operator knows the strip's height for a scanner model it is configured and
cut as is (the papers' method); otherwise the strip is *detected*: the rows above the image region
that look like text — many sharp, high-contrast horizontal transitions — are blanked, from the top
down to the last such row plus a margin.

The image region comes from the Sequence of Ultrasound Regions (0018,6011) when the header has one
(PS3.3 C.8.5.5); else it is estimated as the largest bright connected area, which is the sector.
Nothing at or below the region's first row is ever blanked: the tissue the models read stays
bit-identical.

The strip does not move within a cine: :func:`decide_band` looks once (on the first frame) and
:func:`apply_band` blanks every frame with that decision, each frame getting its own report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import cv2
import numpy as np
from numpy.typing import NDArray

from pipelines.frames import FrameMeta, UltrasoundRegion

logger = logging.getLogger(__name__)

Frame = NDArray[np.uint8]
Method = Literal["configured", "detected"]
RegionSource = Literal["header", "estimated", "none"]


def _no_strips() -> Mapping[tuple[str, str], int]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ScrubParams:
    """How to find and blank the patient strip.

    Attributes
    ----------
    strips
        Strip height in rows per ``(manufacturer, model)``; matched case-insensitively, model
        ``"*"`` for every model of a manufacturer. Unlisted scanners get detection.
    edge_threshold
        Grey-level jump between neighbouring pixels that counts as a glyph edge.
    min_edges_per_row
        Edges a row needs to look like text (a row through a glyph crosses several strokes).
    margin
        Rows blanked below the last text-like row, for descenders and anti-aliased feet.
    max_gap_rows
        Without a header region, the strip ends at the first gap of more rows than this
        without text (a gap separates the strip from the sector on every layout we know).
    fill
        Grey level written into blanked rows.
    region_window, region_min_std, region_min_mean, region_mid_grey, region_min_mid_fraction
        Estimating the image region when the header has none: tissue is where, over a
        ``region_window`` square, the standard deviation and mean exceed their minima and at
        least ``region_min_mid_fraction`` of the pixels are mid-grey (text is black and white).
    region_min_area, region_min_extent, region_margin
        Tissue areas count when they cover ``region_min_area`` of the frame and span
        ``region_min_extent`` of its shorter side both ways; the box widens by ``region_margin``.
    """

    strips: Mapping[tuple[str, str], int] = field(default_factory=_no_strips)
    edge_threshold: int = 40
    min_edges_per_row: int = 4
    margin: int = 4
    max_gap_rows: int = 12
    fill: int = 0
    region_window: int = 9
    region_min_std: float = 6.0
    region_min_mean: float = 12.0
    region_mid_grey: tuple[int, int] = (30, 200)
    region_min_mid_fraction: float = 0.25
    region_min_area: float = 0.002
    region_min_extent: float = 0.08
    region_margin: int = 6

    def __post_init__(self) -> None:
        for key, height in self.strips.items():
            if height < 0:
                raise ValueError(f"strip height {height} for {key}: expected ≥ 0 rows")
        if not isinstance(self.strips, MappingProxyType):
            object.__setattr__(self, "strips", MappingProxyType(dict(self.strips)))

    def configured_strip(self, manufacturer: str, model: str) -> int | None:
        """Configured height for this scanner, exact model first, then the manufacturer's ``*``."""
        wanted = manufacturer.strip().casefold(), model.strip().casefold()
        fallback = None
        for (m, mod), height in self.strips.items():
            if m.strip().casefold() != wanted[0]:
                continue
            if mod.strip().casefold() == wanted[1]:
                return height
            if mod.strip() == "*":
                fallback = height
        return fallback


@dataclass(frozen=True, slots=True)
class BandDecision:
    """Which rows to blank on every frame of one instance, and why."""

    method: Method
    #: Rows ``[0, band_height)`` are blanked (0: nothing text-like above the region).
    band_height: int
    region_source: RegionSource
    region_top: int | None
    capped: bool
    #: ``(rows, columns)`` of the frames the decision was made for.
    shape: tuple[int, int]


@dataclass(frozen=True, slots=True)
class ScrubReport:
    """What :func:`scrub_band` did to one frame; :func:`require_scrubbed` checks it."""

    sop_instance_uid: str
    frame_index: int
    method: Method
    #: Rows ``[0, band_height)`` were blanked (0: nothing text-like above the region).
    band_height: int
    region_source: RegionSource
    #: First row of the image region (nothing at or below it is touched), if known.
    region_top: int | None
    #: The configured strip reached into the header's image region and was cut short.
    capped: bool = False


def scrub_band(
    frame: Frame, meta: FrameMeta, params: ScrubParams | None = None
) -> tuple[Frame, ScrubReport]:
    """Blank the burned-in patient strip of one frame; return a new frame and a report.

    Parameters
    ----------
    frame
        H×W or H×W×C uint8 pixels as decode produced them (RGB).
    meta
        The frame's metadata: scanner identity selects a configured strip, the Ultrasound
        Regions bound what may be blanked.
    params
        Configured strips and detection thresholds.

    Returns
    -------
    frame, report
        A copy of ``frame`` with rows ``[0, report.band_height)`` set to ``params.fill``, and
        what was done and why (configured or detected, where the region came from).
    """
    params = params or ScrubParams()
    return apply_band(frame, meta, decide_band(frame, meta, params), params)


def decide_band(
    frame: Frame, meta: FrameMeta, params: ScrubParams | None = None, *, detect: bool = True
) -> BandDecision:
    """Decide the strip for this frame's instance: configured for the scanner, else detected.

    Parameters
    ----------
    frame
        A frame of the instance (the first of a cine): detection and region estimation look at it.
    meta
        Scanner identity and Ultrasound Regions.
    params
        Configured strips and detection thresholds.
    detect
        Detect the strip when none is configured for the scanner. With ``False`` an unlisted
        scanner raises :class:`ValueError`: the operator chose to rely on configured strips only.
    """
    params = params or ScrubParams()
    if frame.ndim not in (2, 3) or frame.dtype != np.uint8:
        raise ValueError(f"frame {frame.shape} {frame.dtype}: expected H×W[×C] uint8")
    height, width = frame.shape[:2]
    configured = params.configured_strip(meta.manufacturer, meta.model_name)
    if configured is None and not detect:
        raise ValueError(
            f"no PHI strip configured for manufacturer {meta.manufacturer!r} model "
            f"{meta.model_name!r} and strip detection is off"
        )
    region = meta.image_region()
    source: RegionSource = "header"
    if region is not None and not region.within(height, width):
        region = None  # resized after capture: the header's coordinates are not this grid's
    if region is None:
        # Only detection, and a configured strip's cap, need a region; the estimate is costly.
        region = estimate_image_region(frame, params) if configured is None else None
        source = "estimated" if region is not None else "none"
    region_top = None if region is None else max(0, min(region.y0, height))

    capped = False
    method: Method
    if configured is not None:
        method = "configured"
        band = min(configured, height)
        if source == "header" and region_top is not None and band > region_top:
            # The header is authoritative about where tissue is: never blank it.
            logger.warning(
                "configured PHI strip reaches into the image region; cut short",
                extra={"strip_rows": band, "region_top": region_top},
            )
            band, capped = region_top, True
    else:
        method = "detected"
        limit = height if region_top is None else region_top
        gap = None if source == "header" else params.max_gap_rows
        band = detect_text_band(frame, limit, params, gap)
    return BandDecision(method, band, source, region_top, capped, (height, width))


def apply_band(
    frame: Frame,
    meta: FrameMeta,
    decision: BandDecision,
    params: ScrubParams | None = None,
    *,
    in_place: bool = False,
) -> tuple[Frame, ScrubReport]:
    """Blank ``decision.band_height`` rows of one frame; return the frame and its report.

    ``in_place`` writes into ``frame`` (which the caller owns, e.g. fresh from decode) instead
    of a copy.
    """
    params = params or ScrubParams()
    if frame.shape[:2] != decision.shape:
        raise ValueError(
            f"frame of {frame.shape[0]} x {frame.shape[1]} pixels, but the strip was decided "
            f"for {decision.shape[0]} x {decision.shape[1]}"
        )
    out = frame if in_place else frame.copy()
    out[: decision.band_height] = params.fill
    report = ScrubReport(
        sop_instance_uid=meta.sop_instance_uid,
        frame_index=meta.frame_index,
        method=decision.method,
        band_height=decision.band_height,
        region_source=decision.region_source,
        region_top=decision.region_top,
        capped=decision.capped,
    )
    return out, report


def text_rows(frame: Frame, limit: int, params: ScrubParams) -> NDArray[np.bool_]:
    """Which of the rows ``[0, limit)`` look like text: enough sharp horizontal transitions."""
    grey = _grey(frame[:limit]).astype(np.int16)
    if grey.shape[0] == 0 or grey.shape[1] < 2:
        return np.zeros(grey.shape[0], bool)
    jumps = np.abs(np.diff(grey, axis=1)) >= params.edge_threshold
    rows: NDArray[np.bool_] = jumps.sum(axis=1) >= params.min_edges_per_row
    return rows


def detect_text_band(
    frame: Frame, limit: int, params: ScrubParams, max_gap: int | None = None
) -> int:
    """Rows to blank: from the top to the last text-like row above ``limit``, plus a margin.

    With ``max_gap`` the strip ends at the first run of more than ``max_gap`` rows without text
    after text began — used when the region is only estimated, so that speckle a wrong estimate
    left outside the region cannot pass for text. The margin never crosses ``limit``.
    """
    rows = np.flatnonzero(text_rows(frame, limit, params))
    if rows.size == 0:
        return 0
    last = int(rows[-1])
    if max_gap is not None:
        gaps = np.flatnonzero(np.diff(rows) > max_gap + 1)
        if gaps.size:
            last = int(rows[gaps[0]])
    return int(min(limit, last + 1 + params.margin))


def estimate_image_region(
    frame: Frame, params: ScrubParams | None = None
) -> UltrasoundRegion | None:
    """Box around the speckled tissue: the image region when no header declares it.

    Speckle is what tells tissue from everything else on the screen: a median filter erases thin
    strokes (text, calipers, ticks), and what remains with both brightness and local variance is
    tissue; the patient strip, logos and fluid are flat. Lines of glyphs survive the median but
    are too short to count; every large textured area does (fluid splits a sector into pieces).
    The box grows by ``region_margin`` so that its first row lies at or above the sector's.
    """
    params = params or ScrubParams()
    grey = cv2.medianBlur(_grey(frame), 5).astype(np.float32)
    k = (params.region_window, params.region_window)
    mean = cv2.blur(grey, k)
    std = np.sqrt(np.maximum(cv2.blur(grey * grey, k) - mean * mean, 0.0))
    # Glyphs are bright strokes on black: their windows hold few mid-grey pixels; tissue's many.
    mid = ((grey >= params.region_mid_grey[0]) & (grey <= params.region_mid_grey[1])).astype(
        np.float32
    )
    mid_fraction = cv2.blur(mid, k)
    textured = (
        (std >= params.region_min_std)
        & (mean >= params.region_min_mean)
        & (mid_fraction >= params.region_min_mid_fraction)
    ).astype(np.uint8)
    textured = np.asarray(
        cv2.morphologyEx(
            textured, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
        ),
        dtype=np.uint8,
    )
    count, labels, stats, _ = cv2.connectedComponentsWithStats(textured, connectivity=8)
    min_area = params.region_min_area * grey.size
    min_extent = params.region_min_extent * min(grey.shape)
    keep = [
        i
        for i in range(1, count)
        if stats[i, cv2.CC_STAT_AREA] >= min_area
        and min(stats[i, cv2.CC_STAT_WIDTH], stats[i, cv2.CC_STAT_HEIGHT]) >= min_extent
    ]
    if not keep:
        return None
    x0 = min(int(stats[i, cv2.CC_STAT_LEFT]) for i in keep)
    y0 = min(int(stats[i, cv2.CC_STAT_TOP]) for i in keep)
    x1 = max(int(stats[i, cv2.CC_STAT_LEFT] + stats[i, cv2.CC_STAT_WIDTH]) - 1 for i in keep)
    y1 = max(int(stats[i, cv2.CC_STAT_TOP] + stats[i, cv2.CC_STAT_HEIGHT]) - 1 for i in keep)
    m, (h, w) = params.region_margin, grey.shape
    return UltrasoundRegion(
        max(0, x0 - m),
        max(0, y0 - m),
        min(w - 1, x1 + m),
        min(h - 1, y1 + m),
        spatial_format=1,
        data_type=1,
    )


def _grey(frame: Frame) -> NDArray[np.uint8]:
    """Brightest channel: coloured text is as visible as white text."""
    if frame.ndim == 2:
        return frame
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        # cv2.split returns no planes for an empty array (e.g. a region starting at row 0).
        return np.zeros(frame.shape[:2], np.uint8)
    # OpenCV's element-wise max of the planes: numpy's reduction over a 3-long last axis is
    # ~15x slower.
    planes = cv2.split(np.ascontiguousarray(frame))
    result = planes[0]
    for plane in planes[1:]:
        result = cv2.max(result, plane)
    return np.asarray(result)
