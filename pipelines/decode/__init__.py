"""Decode: any ultrasound DICOM instance into RGB uint8 frames plus :class:`FrameMeta`.

The first stage of the pipeline (DESIGN.md §1). It accepts every transfer syntax pydicom's
pixel handlers decode (native little/big endian, deflated, JPEG baseline/extended/lossless,
JPEG-LS, JPEG 2000, RLE) and every Photometric Interpretation found on ultrasound systems, and
always hands on ``(rows, columns, 3)`` uint8 RGB, so no later stage branches on the file format.
Multi-frame cines are streamed frame by frame.
"""

from pipelines.decode.color import (
    SUPPORTED_PHOTOMETRIC,
    RGBConverter,
    RGBFrame,
    YBRConverter,
    grey_curve,
    rgb_converter,
)
from pipelines.decode.frames import LOSSY_TRANSFER_SYNTAXES, Source, iter_frames, read_meta
from pipelines.decode.palette import palette_table
from pipelines.decode.regions import parse_regions
from pipelines.errors import DecodeError

__all__ = [
    "LOSSY_TRANSFER_SYNTAXES",
    "SUPPORTED_PHOTOMETRIC",
    "DecodeError",
    "RGBConverter",
    "RGBFrame",
    "Source",
    "YBRConverter",
    "grey_curve",
    "iter_frames",
    "palette_table",
    "parse_regions",
    "read_meta",
    "rgb_converter",
]
