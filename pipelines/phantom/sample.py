"""Phantom frames and cines with their ground truth: deterministic by seed.

``make_phantom(seed)`` returns the clean frame, the frame as a scanner would burn it (patient strip,
calipers, read-outs), and masks that say exactly which pixels are patient identifiers, which are
annotations, where the sector and the bone are — so scrub and inpaint can be scored, not eyeballed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from pipelines.frames import FrameMeta, UltrasoundRegion
from pipelines.phantom import head as head_scene
from pipelines.phantom import heart as heart_scene
from pipelines.phantom import overlay
from pipelines.phantom.overlay import SyntheticPatient
from pipelines.phantom.params import VENTRICULOMEGALY_MM, AnnotationStyle, PhantomParams
from pipelines.phantom.scene import (
    Box,
    Fan,
    Mask,
    abdominal_wall,
    bounding_box,
    envelope,
    render,
    speckle_field,
)

Kind = Literal["head", "heart"]
Image = NDArray[np.uint8]

#: Equipment identity the phantom's DICOM files carry ("usfmd" alone is reserved for our outputs).
MANUFACTURER = "usfmd-phantom"
MODEL = "phantom-v1"


@dataclass(frozen=True, slots=True)
class PhantomLabels:
    """Ground-truth labels of a frame."""

    kind: Kind
    #: Head: atrial diameter of the far lateral ventricle, mm; ``None`` for hearts.
    atrial_width_mm: float | None = None
    #: Head: atrial diameter ≥ 10 mm.
    ventriculomegaly: bool | None = None
    #: Heart: one of :data:`pipelines.phantom.params.HEART_VIEWS`.
    heart_view: str | None = None


@dataclass(frozen=True, slots=True)
class PhantomSample:
    """One frame: clean and annotated RGB images (H×W×3 uint8) with masks and labels.

    The arrays are read-only: frames of a cine share some of them, and a test that scribbles on
    a sample's pixels would otherwise change what the next assertion sees.
    """

    clean: Image
    annotated: Image
    #: Pixels of burned-in patient identifiers (text of the top strip).
    phi_mask: Mask
    #: Rows of the strip the scanner reserves for them, ``[0, phi_band_height)``.
    phi_band_height: int
    #: Calipers, dotted lines, labels, read-outs and depth ticks.
    annotation_mask: Mask
    fan_mask: Mask
    bone_mask: Mask
    #: Head: the measured atrium (fluid of the far lateral ventricle); empty for hearts.
    ventricle_mask: Mask
    flow_mask: Mask
    #: Tight box of the sector: what Sequence of Ultrasound Regions (0018,6011) declares.
    region: Box
    mm_per_pixel: float
    labels: PhantomLabels
    patient: SyntheticPatient
    seed: int
    style: AnnotationStyle

    def __post_init__(self) -> None:
        for value in (
            self.clean,
            self.annotated,
            self.phi_mask,
            self.annotation_mask,
            self.fan_mask,
            self.bone_mask,
            self.ventricle_mask,
            self.flow_mask,
        ):
            value.setflags(write=False)


def make_phantom(
    seed: int,
    kind: Kind = "head",
    params: PhantomParams | None = None,
    *,
    atrial_width_mm: float | None = None,
    heart_view: str | None = None,
    style: AnnotationStyle = "colour",
    phi: bool = True,
) -> PhantomSample:
    """One annotated frame with its ground truth; the same arguments give the same pixels.

    Parameters
    ----------
    seed
        Everything random — patient identifiers, anatomy placement, speckle, caliper colour —
        derives from it, so a failing test can be replayed exactly.
    kind
        ``"head"`` (transventricular plane, ventriculomegaly labels) or ``"heart"`` (first-
        trimester thorax, heart_view labels).
    params
        Geometry, anatomy and overlay settings; defaults give an 800×600 frame.
    atrial_width_mm
        Head only: the atrial diameter to draw; drawn from ``HeadParams.atrial_width_range_mm``
        when ``None``.
    heart_view
        Heart only: one of :data:`HEART_VIEWS`; drawn uniformly when ``None``.
    style
        ``"colour"`` (yellow / green / cyan calipers, the papers' case), ``"grey"`` (white or
        pale-yellow calipers) or ``"none"`` (no calipers, read-outs or depth scale).
    phi
        Burn the patient strip in.
    """
    return make_cine(
        seed,
        1,
        kind,
        params,
        atrial_width_mm=atrial_width_mm,
        heart_view=heart_view,
        style=style,
        phi=phi,
    )[0]


def make_cine(
    seed: int,
    frames: int,
    kind: Kind = "heart",
    params: PhantomParams | None = None,
    *,
    atrial_width_mm: float | None = None,
    heart_view: str | None = None,
    style: AnnotationStyle = "colour",
    phi: bool = True,
) -> list[PhantomSample]:
    """A loop: anatomy fixed, speckle decorrelating and the heart beating from frame to frame.

    Calipers are drawn on single frames only (``frames == 1``), as on a frozen scanner image; cine
    frames carry the patient strip and the scanner read-outs.
    """
    if frames < 1:
        raise ValueError(f"frames={frames}: expected at least 1")
    if kind not in ("head", "heart"):
        raise ValueError(f"kind={kind!r}: expected 'head' or 'heart'")
    params = params or PhantomParams()
    rng = np.random.default_rng(seed)
    shape = (params.height, params.width)
    fan = Fan.from_params(params)
    fan_mask = fan.mask(*shape)
    region = bounding_box(fan_mask)
    patient = SyntheticPatient.draw(rng)
    depth_frac = float(rng.uniform(0.45, 0.55))
    centre = fan.point(depth_frac, float(rng.uniform(-0.1, 0.1)))
    if kind == "head":
        head_layout = head_scene.draw_layout(rng, params.head, centre, atrial_width_mm)
        mm_per_pixel = params.head.mm_per_pixel
        labels = PhantomLabels(
            "head",
            atrial_width_mm=head_layout.atrial_width_mm,
            ventriculomegaly=head_layout.atrial_width_mm >= VENTRICULOMEGALY_MM,
        )
    else:
        heart_layout = heart_scene.draw_layout(
            rng, params.heart, centre, fan.r1 - fan.r0, heart_view
        )
        mm_per_pixel = params.heart.mm_per_pixel
        labels = PhantomLabels("heart", heart_view=heart_layout.view)
    anatomy_seed = int(rng.integers(2**31))
    colour_choice = int(rng.integers(1 << 16))
    spk_a = speckle_field(rng, shape, params.fan.speckle_sigma)
    spk_b = speckle_field(rng, shape, params.fan.speckle_sigma)

    samples = []
    for index in range(frames):
        # Rotating between two independent complex fields keeps the envelope Rayleigh.
        angle = 0.35 * index
        speckle = envelope(math.cos(angle) * spk_a + math.sin(angle) * spk_b)
        anatomy_rng = np.random.default_rng(anatomy_seed)
        flows: list[tuple[list[tuple[float, float]], int, float]] = []
        ventricle = np.zeros(shape, bool)
        if kind == "head":
            echo, bone, ventricle, items = head_scene.render_head(
                head_layout, params.head, shape, anatomy_rng
            )
        else:
            phase = index / 12.0
            echo, bone, flows, items = heart_scene.render_heart(
                heart_layout, params.heart, shape, anatomy_rng, phase
            )
        abdominal_wall(echo, fan, np.random.default_rng(anatomy_seed + 1), params.fan.wall_fraction)
        grey = render(echo, speckle, fan_mask, params.fan.dynamic_range_db)
        clean = np.repeat(grey[..., None], 3, axis=2)
        flow_mask = heart_scene.paint_flows(clean, flows, fan_mask)
        annotated, phi_mask, annotation_mask = _annotate(
            clean,
            patient,
            region,
            mm_per_pixel,
            params,
            items if frames == 1 else [],
            style,
            phi,
            colour_choice,
        )
        samples.append(
            PhantomSample(
                clean=clean,
                annotated=annotated,
                phi_mask=phi_mask,
                phi_band_height=params.annotation.phi_band_height if phi else 0,
                annotation_mask=annotation_mask,
                fan_mask=fan_mask,
                bone_mask=bone & fan_mask,
                ventricle_mask=ventricle & fan_mask,
                flow_mask=flow_mask,
                region=region,
                mm_per_pixel=mm_per_pixel,
                labels=labels,
                patient=patient,
                seed=seed,
                style=style,
            )
        )
    return samples


def _annotate(
    clean: Image,
    patient: SyntheticPatient,
    region: Box,
    mm_per_pixel: float,
    params: PhantomParams,
    items: list[head_scene.Measurement],
    style: AnnotationStyle,
    phi: bool,
    colour_choice: int,
) -> tuple[Image, Mask, Mask]:
    annotated = clean.copy()
    shape = clean.shape[:2]
    phi_layer = np.zeros(shape, np.uint8)
    if phi:
        phi_layer = overlay.phi_band(annotated, patient, params.annotation)
    layer = np.zeros(shape, np.uint8)
    if style != "none":
        a = params.annotation
        palette = a.colours if style == "colour" else a.greys
        colour = palette[colour_choice % len(palette)]
        overlay.measurements(annotated, layer, items, colour, region, a)
        overlay.scanner_furniture(annotated, layer, region, mm_per_pixel, a)
    return annotated, phi_layer > 0, layer > 0


def frame_meta(
    sample: PhantomSample,
    *,
    with_regions: bool = True,
    sop_instance_uid: str = "2.25.0",
    frame_index: int = 0,
    number_of_frames: int = 1,
    manufacturer: str = MANUFACTURER,
    model_name: str = MODEL,
) -> FrameMeta:
    """The :class:`FrameMeta` decode would produce for this phantom's DICOM file."""
    regions: tuple[UltrasoundRegion, ...] = ()
    if with_regions:
        regions = (phantom_region(sample),)
    return FrameMeta(
        sop_instance_uid=sop_instance_uid,
        frame_index=frame_index,
        number_of_frames=number_of_frames,
        rows=sample.annotated.shape[0],
        columns=sample.annotated.shape[1],
        photometric_interpretation="RGB",
        manufacturer=manufacturer,
        model_name=model_name,
        burned_in_annotation=True,
        regions=regions,
    )


def phantom_region(sample: PhantomSample) -> UltrasoundRegion:
    """The sector as one calibrated 2-D tissue region, physical deltas in cm (PS3.3 C.8.5.5)."""
    r = sample.region
    delta_cm = sample.mm_per_pixel / 10.0
    return UltrasoundRegion(
        r.x0,
        r.y0,
        r.x1,
        r.y1,
        spatial_format=1,
        data_type=1,
        units_x=3,
        units_y=3,
        delta_x=delta_cm,
        delta_y=delta_cm,
        reference_x0=(r.x1 - r.x0) // 2,
        reference_y0=0,
    )
