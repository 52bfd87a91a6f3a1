"""Results as DICOM: the TID 1500 SR and the Secondary Capture heatmap (DESIGN.md §4).

Pure builders: inputs in, a highdicom dataset out, no database or network. The caller chooses the
UIDs (with :func:`derive_uid`, so a rebuilt result keeps its SOP Instance UID), writes the file
and queues it for dispatch.
"""

from pipelines.report.heatmap import (
    COLORMAPS,
    NOT_VERIFIED,
    SYNTHETIC_BANNER,
    HeatmapLayout,
    build_heatmap_sc,
    colorize,
    heatmap_text,
    render_heatmap,
)
from pipelines.report.inputs import USFMD_MANUFACTURER, Algorithm, ImageFinding, SourceImage
from pipelines.report.sr import OBSTETRIC_US, PROBABILITY, PROBABILITY_UNIT, build_sr, tracking_uid
from pipelines.report.uids import derive_uid

__all__ = [
    "COLORMAPS",
    "NOT_VERIFIED",
    "OBSTETRIC_US",
    "PROBABILITY",
    "PROBABILITY_UNIT",
    "SYNTHETIC_BANNER",
    "USFMD_MANUFACTURER",
    "Algorithm",
    "HeatmapLayout",
    "ImageFinding",
    "SourceImage",
    "build_heatmap_sc",
    "build_sr",
    "colorize",
    "derive_uid",
    "heatmap_text",
    "render_heatmap",
    "tracking_uid",
]
