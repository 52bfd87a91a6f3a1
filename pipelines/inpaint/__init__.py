"""Inpaint: find calipers, measurement text and markers burned into a frame and fill them in.

See :mod:`pipelines.inpaint.core` for the method (the papers' HSV saturation mask plus a detector
for white and pale-yellow strokes), :class:`InpaintParams` for its settings, and
:mod:`pipelines.inpaint.fill` for the Navier–Stokes fill.
"""

from pipelines.inpaint.core import (
    InpaintParams,
    annotation_mask,
    bright_mark_mask,
    colour_mask,
    inpaint,
    saturation_threshold,
)
from pipelines.inpaint.fill import fill_navier_stokes

__all__ = [
    "InpaintParams",
    "annotation_mask",
    "bright_mark_mask",
    "colour_mask",
    "fill_navier_stokes",
    "inpaint",
    "saturation_threshold",
]
