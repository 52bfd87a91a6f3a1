"""Inpaint: find calipers, measurement text and markers burned into a frame and fill them in.

See :mod:`pipelines.inpaint.core` for the method (the papers' HSV saturation mask plus a detector
for white and pale-yellow strokes) and :class:`InpaintParams` for its settings.
"""

from pipelines.inpaint.core import (
    InpaintParams,
    annotation_mask,
    bright_mark_mask,
    colour_mask,
    inpaint,
    saturation_threshold,
)

__all__ = [
    "InpaintParams",
    "annotation_mask",
    "bright_mark_mask",
    "colour_mask",
    "inpaint",
    "saturation_threshold",
]
