"""Parse the Sequence of Ultrasound Regions (0018,6011), PS3.3 C.8.5.5.

The regions tell later stages where the tissue image lies inside the screen capture (everything
else is annotation, colour bars and waveforms) and how large a pixel is, which measurements such
as the ventricular atrial diameter (≥ 10 mm, DESIGN.md §3) need.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset

from pipelines.frames import UltrasoundRegion

log = logging.getLogger(__name__)

#: Region Location Min/Max (0018,6018/601A/601C/601E) are Type 1 in each item (PS3.3 C.8.5.5).
_LOCATION = (
    "RegionLocationMinX0",
    "RegionLocationMinY0",
    "RegionLocationMaxX1",
    "RegionLocationMaxY1",
)


def _optional_int(item: Dataset, keyword: str) -> int | None:
    value: Any = item.get(keyword)
    return None if value is None or value == "" else int(value)


def _optional_float(item: Dataset, keyword: str) -> float | None:
    value: Any = item.get(keyword)
    return None if value is None or value == "" else float(value)


def parse_regions(ds: Dataset) -> tuple[UltrasoundRegion, ...]:
    """Every well-formed item of the Sequence of Ultrasound Regions, in stored order.

    Coordinates are kept as stored, even where they run past Rows/Columns (files that were
    resized without updating the header do this; :meth:`UltrasoundRegion.within` tells).
    An item that lacks a Type 1 location, or whose max lies before its min, is skipped with a
    warning rather than failing the frame: the pixels are still worth analysing.

    Parameters
    ----------
    ds
        An ultrasound image header (US Region Calibration module, PS3.3 C.8.5.5).

    Returns
    -------
    tuple of UltrasoundRegion
        Empty when the header carries no regions.
    """
    regions: list[UltrasoundRegion] = []
    for number, item in enumerate(ds.get("SequenceOfUltrasoundRegions") or (), start=1):
        location = [_optional_int(item, keyword) for keyword in _LOCATION]
        if None in location:
            log.warning("ultrasound region item %d lacks a Type 1 Region Location; skipped", number)
            continue
        x0, y0, x1, y1 = (int(v) for v in location if v is not None)
        if x1 < x0 or y1 < y0:
            log.warning("ultrasound region item %d has max before min; skipped", number)
            continue
        regions.append(
            UltrasoundRegion(
                x0=x0,
                y0=y0,
                x1=x1,
                y1=y1,
                spatial_format=_optional_int(item, "RegionSpatialFormat") or 0,
                data_type=_optional_int(item, "RegionDataType") or 0,
                units_x=_optional_int(item, "PhysicalUnitsXDirection") or 0,
                units_y=_optional_int(item, "PhysicalUnitsYDirection") or 0,
                delta_x=_optional_float(item, "PhysicalDeltaX"),
                delta_y=_optional_float(item, "PhysicalDeltaY"),
                flags=_optional_int(item, "RegionFlags") or 0,
                reference_x0=_optional_int(item, "ReferencePixelX0"),
                reference_y0=_optional_int(item, "ReferencePixelY0"),
            )
        )
    return tuple(regions)
