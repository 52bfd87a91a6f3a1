"""What scanners burn into the pixels: the patient strip, calipers, read-outs, depth scale.

Everything is drawn without anti-aliasing (``LINE_8``), as scanner overlays are, and drawn a
second time into a mask, so the ground truth is exactly the set of pixels that changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from pipelines.phantom.head import Measurement
from pipelines.phantom.params import AnnotationParams
from pipelines.phantom.scene import Box

Image = NDArray[np.uint8]
Colour = tuple[int, int, int]
FONT = cv2.FONT_HERSHEY_SIMPLEX

_GIVEN = ("JANE", "MARY", "ANNA", "LENA", "SOFIA", "EMMA", "NORA", "IDA", "MAYA", "ZOE")
_FAMILY = ("DOE", "ROE", "MUSTERMANN", "SAMPLE", "TESTER", "PHANTOM", "EXAMPLE", "DUMMY")


@dataclass(frozen=True, slots=True)
class SyntheticPatient:
    """Invented identifiers: what the PHI band shows and the DICOM header carries."""

    name: str
    patient_id: str
    birth_date: str
    study_date: str
    study_time: str
    accession: str
    institution: str = "SYNTHETIC HOSPITAL"

    @classmethod
    def draw(cls, rng: np.random.Generator) -> SyntheticPatient:
        name = f"{rng.choice(_FAMILY)}^{rng.choice(_GIVEN)}"
        year = int(rng.integers(1980, 2004))
        month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
        s_month, s_day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
        hour, minute, second = (
            int(rng.integers(7, 19)),
            int(rng.integers(0, 60)),
            int(rng.integers(0, 60)),
        )
        return cls(
            name=name,
            patient_id=f"PH{int(rng.integers(10**7, 10**8))}",
            birth_date=f"{year:04d}{month:02d}{day:02d}",
            study_date=f"2024{s_month:02d}{s_day:02d}",
            study_time=f"{hour:02d}{minute:02d}{second:02d}",
            accession=f"ACC{int(rng.integers(10**5, 10**6))}",
        )

    def band_text(self) -> tuple[str, str]:
        """Left and right halves of the strip, formatted as scanners print them."""
        d, s, t = self.birth_date, self.study_date, self.study_time
        left = f"{self.name}  ID:{self.patient_id}  DOB:{d[:4]}-{d[4:6]}-{d[6:]}"
        right = f"{s[:4]}-{s[4:6]}-{s[6:]} {t[:2]}:{t[2:4]}:{t[4:]}  {self.institution}"
        return left, right


def text(
    rgb: Image, layer: Image, message: str, org: tuple[int, int], colour: Colour, scale: float
) -> None:
    """Burn ``message`` with its baseline-left corner at ``org`` into the image and the mask.

    OpenCV 5 renders glyphs anti-aliased whatever the line type; scanners burn hard-edged
    bitmap fonts, so the coverage is thresholded at one half and painted in one colour.
    """
    coverage = np.zeros(layer.shape, np.uint8)
    cv2.putText(coverage, message, org, FONT, scale, 255, 1, cv2.LINE_8)
    glyphs = coverage >= 128
    rgb[glyphs] = colour
    layer[glyphs] = 255


def phi_band(rgb: Image, patient: SyntheticPatient, params: AnnotationParams) -> Image:
    """A dark strip across the top with the patient's name, ID, birth date and study time."""
    height, width = rgb.shape[:2]
    rgb[: params.phi_band_height] = params.phi_band_grey
    layer = np.zeros((height, width), np.uint8)
    left, right = patient.band_text()
    grey = (params.phi_text_grey,) * 3
    baseline = params.phi_band_height // 2 + 6
    text(rgb, layer, left, (8, baseline), grey, params.font_scale)
    (w, _), _ = cv2.getTextSize(right, FONT, params.font_scale, 1)
    text(rgb, layer, right, (width - w - 8, baseline), grey, params.font_scale)
    return layer


def cross(rgb: Image, layer: Image, p: tuple[float, float], arm: int, colour: Colour) -> None:
    """A caliper end point: a thin '+'."""
    x, y = round(p[0]), round(p[1])
    for a, b in (((x - arm, y), (x + arm, y)), ((x, y - arm), (x, y + arm))):
        cv2.line(rgb, a, b, colour, 1, cv2.LINE_8)
        cv2.line(layer, a, b, 255, 1, cv2.LINE_8)


def dotted(
    rgb: Image,
    layer: Image,
    p: tuple[float, float],
    q: tuple[float, float],
    colour: Colour,
    params: AnnotationParams,
) -> None:
    """The dotted line between two calipers, leaving the end points themselves clear."""
    length = math.hypot(q[0] - p[0], q[1] - p[1])
    if length < 1:
        return
    ux, uy = (q[0] - p[0]) / length, (q[1] - p[1]) / length
    step = params.dot_length + params.dot_gap
    s = params.caliper_arm + params.dot_gap
    while s + params.dot_length < length - params.caliper_arm - params.dot_gap / 2:
        a = (round(p[0] + ux * s), round(p[1] + uy * s))
        b = (
            round(p[0] + ux * (s + params.dot_length - 1)),
            round(p[1] + uy * (s + params.dot_length - 1)),
        )
        cv2.line(rgb, a, b, colour, 1, cv2.LINE_8)
        cv2.line(layer, a, b, 255, 1, cv2.LINE_8)
        s += step


def measurements(
    rgb: Image,
    layer: Image,
    items: list[Measurement],
    colour: Colour,
    region: Box,
    params: AnnotationParams,
) -> None:
    """Calipers, numbered labels beside the first cross, and the results box in a corner."""
    for index, m in enumerate(items, start=1):
        cross(rgb, layer, m.start, params.caliper_arm, colour)
        cross(rgb, layer, m.end, params.caliper_arm, colour)
        dotted(rgb, layer, m.start, m.end, colour, params)
        label = (
            round(m.start[0]) + params.caliper_arm + 3,
            round(m.start[1]) - params.caliper_arm - 2,
        )
        text(rgb, layer, str(index), label, colour, params.font_scale * 0.8)
    y = region.y1 - 8 - 18 * (len(items) - 1)
    for index, m in enumerate(items, start=1):
        text(
            rgb,
            layer,
            f"{index} {m.name} {m.value_mm:.1f} mm",
            (region.x0 + 4, y),
            colour,
            params.font_scale * 0.9,
        )
        y += 18


def scanner_furniture(
    rgb: Image, layer: Image, region: Box, mm_per_pixel: float, params: AnnotationParams
) -> None:
    """Depth-scale ticks right of the sector and the technical read-outs left of it."""
    white = (235, 235, 235)
    step = params.depth_tick_cm * 10.0 / mm_per_pixel
    x = region.x1 + 6
    y = float(region.y0)
    while y <= region.y1 and x + 6 < rgb.shape[1]:
        cv2.line(rgb, (x, round(y)), (x + 6, round(y)), white, 1, cv2.LINE_8)
        cv2.line(layer, (x, round(y)), (x + 6, round(y)), 255, 1, cv2.LINE_8)
        y += step
    for row, message in enumerate(("C5-1", "MI 0.9", "TIs 0.3", "FR 32Hz", "DR 60")):
        text(rgb, layer, message, (10, region.y0 + 20 + 20 * row), white, params.font_scale * 0.85)
