"""The heatmap: a Secondary Capture of the reported frame with its Eigen-CAM map burned in.

Every PACS displays a Secondary Capture (DESIGN.md §4), so this is how a reader sees *where* the
model looked. The frame keeps its own pixel grid at the top left; the map is blended in only where
it is hot (above ``floor``), in a perceptually uniform colour map, so cold anatomy stays exactly as
acquired. A black band below carries the finding with its probability, "AI result - not verified",
the model (and "SYNTHETIC DEMO MODEL" for phantom-trained models) and a colour legend from 0 to 1.

The object is Burned In Annotation YES, Conversion Type WSD, RGB, uncompressed, in the source's
study and a new series, and references its source image (and frame) in the Source Image Sequence.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Final, Literal

import cv2
import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from pipelines.report.common import (
    algorithm_equipment,
    check_new_object_uids,
    coding_scheme_items,
    resolve_created,
    stamp_created,
    study_header,
)
from pipelines.report.inputs import USFMD_MANUFACTURER, Algorithm, ImageFinding

logger = logging.getLogger(__name__)

Colormap = Literal["viridis", "inferno", "magma", "plasma", "cividis"]
#: Perceptually uniform maps only (no jet/rainbow: false edges where the hue flips).
COLORMAPS: Final[dict[str, int]] = {
    "viridis": cv2.COLORMAP_VIRIDIS,
    "inferno": cv2.COLORMAP_INFERNO,
    "magma": cv2.COLORMAP_MAGMA,
    "plasma": cv2.COLORMAP_PLASMA,
    "cividis": cv2.COLORMAP_CIVIDIS,
}
NOT_VERIFIED = "AI result - not verified"
SYNTHETIC_BANNER = "SYNTHETIC DEMO MODEL"
#: Narrowest output: the text must stay legible on tiny frames.
MIN_WIDTH = 320
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_MIN_SCALE = 0.35
_MAX_SCALE = 0.7
_WHITE = (255, 255, 255)
_AMBER = (255, 191, 0)
#: (121322, DCM, "Source image for image processing operation"), PS3.16 CID 7202.
SOURCE_FOR_PROCESSING = hd.sr.CodedConcept(
    "121322", "DCM", "Source image for image processing operation"
)
#: Slack for float rounding at the ends of a map normalised to [0, 1].
_CAM_TOLERANCE = 1e-4

RGBImage = NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class HeatmapLayout:
    """Where things are in a rendered heatmap (pixel rows/columns, end-exclusive)."""

    rows: int
    columns: int
    #: The frame occupies ``[0, frame_rows) x [0, frame_columns)``; everything else is the band.
    frame_rows: int
    frame_columns: int
    #: Colour bar of the legend: ``(top, bottom, left, right)``.
    legend: tuple[int, int, int, int]


def colorize(values: NDArray[np.floating], colormap: Colormap = "viridis") -> RGBImage:
    """``values`` in [0, 1] as RGB colours of ``colormap`` (any shape; a trailing axis of 3)."""
    if colormap not in COLORMAPS:
        raise ValueError(f"colormap {colormap!r}: expected one of {sorted(COLORMAPS)}")
    levels = np.clip(np.rint(np.asarray(values, dtype=np.float64) * 255.0), 0, 255)
    flat = levels.astype(np.uint8).reshape(-1, 1)
    bgr = cv2.applyColorMap(flat, COLORMAPS[colormap]).reshape(*levels.shape, 3)
    return np.ascontiguousarray(bgr[..., ::-1])


def _check_frame(frame: object) -> RGBImage:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        raise ValueError("frame must be a numpy uint8 array")
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] < 1 or frame.shape[1] < 1:
        raise ValueError(f"frame must be (rows, columns, 3) RGB, got shape {frame.shape}")
    return frame


def _check_cam(cam: object, shape: tuple[int, int]) -> NDArray[np.float64]:
    if not isinstance(cam, np.ndarray) or not np.issubdtype(cam.dtype, np.floating):
        raise ValueError("cam must be a numpy float array")
    if cam.shape != shape:
        raise ValueError(
            f"cam shape {cam.shape} differs from the frame's {shape}: map it back onto the "
            "frame's pixel grid first"
        )
    values = cam.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("cam has NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < -_CAM_TOLERANCE or high > 1.0 + _CAM_TOLERANCE:
        raise ValueError(f"cam values must lie in [0, 1], got [{low:.4f}, {high:.4f}]")
    return np.clip(values, 0.0, 1.0)


def _fit_scale(lines: list[str], width: int) -> tuple[float, int]:
    """Largest font scale (≤ ``_MAX_SCALE``) at which every line fits ``width``; the width too,
    widened when even the smallest legible scale does not fit."""
    widest = max(cv2.getTextSize(line, _FONT, 1.0, 1)[0][0] for line in lines)
    scale = min(_MAX_SCALE, (width - 16) / widest)
    if scale < _MIN_SCALE:
        scale = _MIN_SCALE
        width = int(np.ceil(widest * scale)) + 16
    return scale, width


def render_heatmap(
    frame: RGBImage,
    cam: NDArray[np.floating],
    lines: list[str],
    *,
    alpha: float = 0.5,
    floor: float = 0.2,
    colormap: Colormap = "viridis",
    banner: str | None = None,
) -> tuple[RGBImage, HeatmapLayout]:
    """Blend ``cam`` over ``frame`` and add the text band with its legend.

    The overlay weight is ``alpha * (cam - floor) / (1 - floor)``, clipped at 0: pixels where
    the map is at or below ``floor`` are the frame's own, unchanged.

    Parameters
    ----------
    frame
        ``(rows, columns, 3)`` RGB uint8, the frame on its original pixel grid.
    cam
        ``(rows, columns)`` float map in [0, 1] on the same grid.
    lines
        Printable ASCII text lines, drawn in white.
    banner
        An optional first line drawn in amber (the synthetic-model warning).
    """
    frame = _check_frame(frame)
    rows, columns = frame.shape[:2]
    values = _check_cam(cam, (rows, columns))
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"floor must be in [0, 1), got {floor}")
    text = ([banner] if banner else []) + list(lines)
    for line in text:
        if not line or not (line.isascii() and line.isprintable()):
            raise ValueError(f"text line {line!r} must be non-empty printable ASCII")

    weight = alpha * np.clip((values - floor) / (1.0 - floor), 0.0, 1.0)[..., None]
    colours = colorize(values, colormap).astype(np.float64)
    # Where the weight is 0 this is exactly the frame (x * 1.0 + y * 0.0 == x in floating point).
    blended = np.rint(frame * (1.0 - weight) + colours * weight).astype(np.uint8)

    legend_caption = "Eigen-CAM"
    scale, width = _fit_scale(text + [f"{legend_caption} 0 {'#' * 12} 1"], max(columns, MIN_WIDTH))
    thickness = 1 if scale < 0.8 else 2
    (_, text_height), baseline = cv2.getTextSize("Ag", _FONT, scale, thickness)
    line_height = text_height + baseline + max(4, text_height // 2)
    margin = 8
    band = margin + line_height * (len(text) + 1) + margin
    canvas = np.zeros((rows + band, width, 3), dtype=np.uint8)
    canvas[:rows, :columns] = blended

    y = rows + margin + text_height
    for index, line in enumerate(text):
        colour = _AMBER if banner and index == 0 else _WHITE
        cv2.putText(canvas, line, (margin, y), _FONT, scale, colour, thickness, cv2.LINE_AA)
        y += line_height

    # Legend row: caption, "0", the colour bar, "1".
    x = margin
    cv2.putText(canvas, legend_caption, (x, y), _FONT, scale, _WHITE, thickness, cv2.LINE_AA)
    x += cv2.getTextSize(legend_caption + " ", _FONT, scale, thickness)[0][0]
    cv2.putText(canvas, "0", (x, y), _FONT, scale, _WHITE, thickness, cv2.LINE_AA)
    x += cv2.getTextSize("0 ", _FONT, scale, thickness)[0][0]
    one_width = cv2.getTextSize(" 1", _FONT, scale, thickness)[0][0]
    bar_right = min(width - margin - one_width, x + 256)
    top, bottom = y - text_height, y + 1
    ramp = np.linspace(0.0, 1.0, max(bar_right - x, 2))
    canvas[top:bottom, x:bar_right] = colorize(ramp, colormap)[None, : bar_right - x]
    cv2.putText(
        canvas,
        "1",
        (bar_right + one_width // 3, y),
        _FONT,
        scale,
        _WHITE,
        thickness,
        cv2.LINE_AA,
    )
    layout = HeatmapLayout(
        rows=rows + band,
        columns=width,
        frame_rows=rows,
        frame_columns=columns,
        legend=(top, bottom, x, bar_right),
    )
    return canvas, layout


def heatmap_text(finding: ImageFinding, algorithm: Algorithm) -> tuple[str | None, list[str]]:
    """The banner (synthetic models only) and the lines burned into a finding's heatmap."""
    model = f"model {algorithm.name} {algorithm.version}"
    frame = finding.reported_frame
    if frame is not None:
        model += f" - frame {frame}/{finding.source.number_of_frames}"
        if finding.aggregation is not None:
            model += f" ({finding.aggregation})"
    lines = [
        f"{finding.code.meaning} p={finding.probability:.2f}",
        NOT_VERIFIED,
        model,
    ]
    return (SYNTHETIC_BANNER if algorithm.synthetic else None), lines


def _source_reference(finding: ImageFinding) -> Dataset:
    """Source Image Sequence (0008,2112) item (Image SOP Instance Reference Macro, PS3.3 Table
    10-3): the frame is named only where the source's SOP Class has frames."""
    item = Dataset()
    item.ReferencedSOPClassUID = finding.source.sop_class_uid
    item.ReferencedSOPInstanceUID = finding.source.sop_instance_uid
    frames = finding.source.frame_reference(finding.reported_frame)
    if frames is not None:
        item.ReferencedFrameNumber = frames[0]
    item.PurposeOfReferenceCodeSequence = [SOURCE_FOR_PROCESSING]
    return item


def _copy_anatomy(sc: Dataset, header: Dataset) -> None:
    """Body Part Examined and Laterality of the source's General Series (PS3.3 C.7.3.1).

    Laterality is Type 2C: required when the body part is paired. The heatmap shows the source's
    anatomy, so it takes the source's values; when the body part is unknown, whether it is paired
    is unknown too, and Laterality is sent empty, which the standard reserves for "unknown".
    """
    body_part = str(header.get("BodyPartExamined") or "")
    if body_part:
        sc.BodyPartExamined = body_part
    if "Laterality" in header:
        sc.Laterality = header.Laterality or None
    elif not body_part:
        sc.Laterality = None


def build_heatmap_sc(
    finding: ImageFinding,
    algorithm: Algorithm,
    frame: RGBImage,
    cam: NDArray[np.floating],
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int = 1,
    created: datetime.datetime | None = None,
    alpha: float = 0.5,
    floor: float = 0.2,
    colormap: Colormap = "viridis",
) -> hd.sc.SCImage:
    """The Secondary Capture heatmap of ``finding`` on its reported frame.

    Parameters
    ----------
    frame
        The reported frame (``finding.reported_frame``, or the image) as decoded RGB uint8, on
        the source's own Rows x Columns grid.
    cam
        Eigen-CAM map on the same grid, values in [0, 1].
    series_instance_uid, series_number, sop_instance_uid, instance_number
        Chosen by the caller (deterministic, see :func:`pipelines.report.derive_uid`); the
        series must be new.
    created
        Time stamps of the object; pass a stored one to rebuild identically.

    Raises
    ------
    ValueError
        Frame or map of the wrong shape, type or range, or unusable UIDs.
    """
    if not isinstance(finding, ImageFinding):
        raise ValueError(f"finding must be an ImageFinding, got {type(finding).__name__}")
    if not isinstance(algorithm, Algorithm):
        raise ValueError(f"algorithm must be an Algorithm, got {type(algorithm).__name__}")
    source = finding.source
    frame = _check_frame(frame)
    if frame.shape[:2] != (source.rows, source.columns):
        raise ValueError(
            f"frame shape {frame.shape[:2]} differs from SOP Instance {source.sop_instance_uid}'s "
            f"{source.rows} x {source.columns}: pass the frame on its original pixel grid"
        )
    header = study_header(source.header)
    check_new_object_uids(
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        sources=[header],
    )
    when = resolve_created(created)
    banner, lines = heatmap_text(finding, algorithm)
    pixels, _ = render_heatmap(
        frame, cam, lines, alpha=alpha, floor=floor, colormap=colormap, banner=banner
    )

    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        # highdicom wants a coordinate system and, for PATIENT, an orientation; ultrasound has
        # none, so the placeholder is replaced by the source's (empty) value below.
        coordinate_system="PATIENT",
        patient_orientation=("A", "F"),
        study_instance_uid=source.study_instance_uid,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=USFMD_MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[algorithm_equipment(algorithm, when)],
        series_description=f"usfmd heatmap: {finding.task.name}"[:64],
        specific_character_set=header.get("SpecificCharacterSet"),
    )
    # Names and the rest of the Patient / General Study modules are copied here rather than
    # passed to the constructor, which warns quoting names without '^' (PS3.5 6.2 allows them).
    sc.copy_patient_and_study_information(header)
    # General Image: Patient Orientation is Type 2C, empty when unknown (PS3.3 C.7.6.1).
    orientation = header.get("PatientOrientation")
    if not orientation:
        sc.PatientOrientation = []
    else:
        sc.PatientOrientation = [orientation] if isinstance(orientation, str) else list(orientation)
    _copy_anatomy(sc, header)
    sc.BurnedInAnnotation = "YES"  # the finding and the source's own annotations (C.7.6.1)
    sc.ConversionType = "WSD"  # workstation (PS3.3 C.8.6.1)
    sc.SecondaryCaptureDeviceManufacturer = USFMD_MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = algorithm.name
    sc.SecondaryCaptureDeviceSoftwareVersions = algorithm.version
    sc.DateOfSecondaryCapture = DA(when.date())
    sc.TimeOfSecondaryCapture = TM(when.time())
    sc.SourceImageSequence = [_source_reference(finding)]
    frame_text = "" if finding.reported_frame is None else f" {finding.reported_frame}"
    sc.DerivationDescription = (
        f"Eigen-CAM map of {algorithm.name} {algorithm.version} blended over frame{frame_text} "
        f"of the source (alpha {alpha}, floor {floor}, {colormap}); finding burned in"
    )
    sc.ImageComments = f"{NOT_VERIFIED}: " + "; ".join(([banner] if banner else []) + lines[:1])
    # PS3.3 C.7.6.1.1.5: pixels that were once lossy-compressed stay flagged in derived images.
    if source.lossy:
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source.header:
                setattr(sc, keyword, source.header[keyword].value)
    else:
        sc.LossyImageCompression = "00"
    sc.CodingSchemeIdentificationSequence = coding_scheme_items()
    stamp_created(sc, when)
    logger.info(
        "built heatmap SC",
        extra={
            "sop_instance_uid": sop_instance_uid,
            "source_sop_instance_uid": source.sop_instance_uid,
            "task": finding.task.name,
            "device_uid": algorithm.device_uid,
        },
    )
    return sc
