"""Synthetic phantom: determinism, ground truth that matches the pixels, DICOM round trips."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)

from pipelines.phantom import (
    HEART_VIEWS,
    MANUFACTURER,
    MODEL,
    PhantomParams,
    PhantomSample,
    frame_meta,
    make_cine,
    make_phantom,
)
from pipelines.phantom.dicom import SYNTHETIC, phantom_dataset, write_phantom
from pipelines.phantom.params import FanParams


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


@pytest.fixture(scope="module")
def head() -> PhantomSample:
    return make_phantom(7, "head", atrial_width_mm=12.5)


def test_same_seed_same_frame_other_seed_other_frame() -> None:
    a, b = make_phantom(3, "head"), make_phantom(3, "head")
    assert np.array_equal(a.clean, b.clean) and np.array_equal(a.annotated, b.annotated)
    for name in ("phi_mask", "annotation_mask", "fan_mask", "bone_mask", "flow_mask"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.labels == b.labels and a.patient == b.patient
    c = make_phantom(4, "head")
    assert not np.array_equal(a.clean, c.clean)
    assert a.patient != c.patient


@pytest.mark.parametrize("width", [6.0, 9.9, 10.0, 14.0])
def test_atrial_width_label_and_geometry(width: float) -> None:
    sample = make_phantom(11, "head", atrial_width_mm=width)
    assert sample.labels.kind == "head"
    assert sample.labels.atrial_width_mm == width
    assert sample.labels.ventriculomegaly is (width >= 10.0)
    # The drawn atrium really is that wide: the minor axis of the fitted ellipse, in mm.
    contours, _ = cv2.findContours(
        sample.ventricle_mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
    )
    (_, _), axes, _ = cv2.fitEllipse(max(contours, key=cv2.contourArea))
    assert min(axes) * sample.mm_per_pixel == pytest.approx(width, abs=0.6)


def test_masks_agree_with_pixels(head: PhantomSample) -> None:
    band = head.phi_band_height
    assert band > 0 and head.phi_mask.any() and head.annotation_mask.any()
    assert not head.phi_mask[band:].any(), "patient text stays inside the strip"
    assert not (head.phi_mask & head.annotation_mask).any()
    changed = (head.annotated != head.clean).any(axis=2)
    # Every changed pixel is explained by a mask (the strip's background counts as the strip).
    explained = head.phi_mask | head.annotation_mask
    explained[:band] = True
    assert not (changed & ~explained).any()
    assert changed[head.annotation_mask].mean() > 0.9  # marks are visible where they were drawn
    # The region box is the sector's tight box; everything outside the sector is black.
    r = head.region
    rows, cols = np.nonzero(head.fan_mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (r.y0, r.y1, r.x0, r.x1)
    assert r.y0 > band
    assert not head.clean[~head.fan_mask].any()
    assert not (head.bone_mask & ~head.fan_mask).any() and head.bone_mask.sum() > 1000


def test_heart_views_are_visibly_distinct() -> None:
    def flows(sample: PhantomSample) -> tuple[int, int, int]:
        px = sample.clean[sample.flow_mask].astype(int)
        red = int((px[:, 0] > px[:, 2] + 60).sum())
        blue = int((px[:, 2] > px[:, 0] + 60).sum())
        count, _ = cv2.connectedComponents(sample.flow_mask.astype(np.uint8))
        return red, blue, count - 1

    seen = {}
    for seed, view in enumerate(HEART_VIEWS):
        sample = make_phantom(100 + seed, "heart", heart_view=view)
        assert sample.labels.heart_view == view and sample.labels.atrial_width_mm is None
        seen[view] = flows(sample)
    assert seen["other"] == (0, 0, 0)
    red, blue, parts = seen["aorta"]
    assert red > 200 and blue == 0 and parts == 1
    red, blue, parts = seen["atrioventricular_flows"]
    assert red > 200 and blue == 0 and parts == 2
    red, blue, parts = seen["v_sign"]
    assert blue > 200 and red == 0 and parts == 1  # the two arches meet in the V
    red, blue, parts = seen["x_sign"]
    assert red > 200 and blue > 200 and parts == 1  # they cross


def test_cine_moves_but_keeps_anatomy_and_labels() -> None:
    frames = make_cine(5, 3, "heart", heart_view="x_sign")
    assert len(frames) == 3
    assert not np.array_equal(frames[0].clean, frames[1].clean)
    assert all(f.labels == frames[0].labels and f.region == frames[0].region for f in frames)
    assert all(np.array_equal(f.phi_mask, frames[0].phi_mask) for f in frames)
    assert np.array_equal(make_cine(5, 3, "heart", heart_view="x_sign")[2].clean, frames[2].clean)


def test_invalid_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="fan.top"):
        PhantomParams(fan=FanParams(top=20))
    with pytest.raises(ValueError, match="outer_radius"):
        PhantomParams(fan=FanParams(outer_radius=700))
    with pytest.raises(ValueError, match="atrial_width_mm"):
        make_phantom(1, "head", atrial_width_mm=0.2)
    with pytest.raises(ValueError, match="heart view"):
        make_phantom(1, "heart", heart_view="tetralogy")
    with pytest.raises(ValueError, match="frames"):
        make_cine(1, 0)


def test_frame_meta_carries_the_calibrated_region(head: PhantomSample) -> None:
    meta = frame_meta(head)
    region = meta.image_region()
    assert region is not None and meta.manufacturer == MANUFACTURER
    assert (region.x0, region.y0, region.x1, region.y1) == (
        head.region.x0,
        head.region.y0,
        head.region.x1,
        head.region.y1,
    )
    assert region.mm_per_pixel() == pytest.approx((head.mm_per_pixel, head.mm_per_pixel))
    assert frame_meta(head, with_regions=False).image_region() is None


def _check_header(ds: pydicom.Dataset, sample: PhantomSample) -> None:
    assert ds.Modality == "US" and ds.BurnedInAnnotation == "YES"
    assert ds.Manufacturer == MANUFACTURER and ds.ManufacturerModelName == MODEL
    assert SYNTHETIC in ds.SeriesDescription and SYNTHETIC in ds.StudyDescription
    assert ds.PatientName == sample.patient.name and ds.PatientID == sample.patient.patient_id
    (item,) = ds.SequenceOfUltrasoundRegions
    r = sample.region
    assert (
        item.RegionLocationMinX0,
        item.RegionLocationMinY0,
        item.RegionLocationMaxX1,
        item.RegionLocationMaxY1,
    ) == (r.x0, r.y0, r.x1, r.y1)
    assert item.RegionSpatialFormat == 1 and item.RegionDataType == 1
    assert item.PhysicalUnitsXDirection == 3 and item.PhysicalUnitsYDirection == 3
    assert item.PhysicalDeltaX == pytest.approx(sample.mm_per_pixel / 10)
    for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
        assert uid.is_valid and uid.startswith("2.25.")
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_single_frame_uncompressed_round_trip(tmp_path: Path, head: PhantomSample) -> None:
    path = tmp_path / "us.dcm"
    write_phantom(path, [head])
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == UltrasoundImageStorage
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PhotometricInterpretation == "RGB" and "NumberOfFrames" not in ds
    assert np.array_equal(ds.pixel_array, head.annotated)
    _check_header(ds, head)
    again = phantom_dataset([head])
    assert again.SOPInstanceUID == ds.SOPInstanceUID  # deterministic by seed
    assert again.StudyInstanceUID == ds.StudyInstanceUID


def test_single_frame_jpeg_baseline_round_trip(tmp_path: Path, head: PhantomSample) -> None:
    path = tmp_path / "us_jpeg.dcm"
    write_phantom(path, [head], transfer_syntax=JPEGBaseline8Bit)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert ds.PhotometricInterpretation == "YBR_FULL_422" and ds.LossyImageCompression == "01"
    decoded = ds.pixel_array  # pydicom converts YCbCr to RGB
    assert decoded.shape == head.annotated.shape
    error = np.abs(decoded.astype(int) - head.annotated.astype(int))
    psnr = _psnr(decoded, head.annotated)
    print(f"JPEG Baseline q95 4:2:2: PSNR {psnr:.1f} dB, mean |error| {error.mean():.2f}")
    assert psnr > 35 and error.mean() < 2.0
    _check_header(ds, head)
    assert ds.SOPInstanceUID != phantom_dataset([head]).SOPInstanceUID  # another instance


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEGBaseline8Bit])
def test_cine_round_trip(tmp_path: Path, syntax: str) -> None:
    frames = make_cine(9, 4, "heart", heart_view="atrioventricular_flows")
    path = tmp_path / "cine.dcm"
    write_phantom(path, frames, transfer_syntax=syntax, frame_time_ms=40.0)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == UltrasoundMultiFrameImageStorage
    assert ds.NumberOfFrames == 4 and ds.FrameTime == 40.0 and ds.CineRate == 25
    assert ds.FrameIncrementPointer == 0x00181063
    pixels = ds.pixel_array
    expected = np.stack([f.annotated for f in frames])
    assert pixels.shape == expected.shape
    if syntax == ExplicitVRLittleEndian:
        assert np.array_equal(pixels, expected)
    else:
        assert _psnr(pixels, expected) > 35
    _check_header(ds, frames[0])


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
@pytest.mark.parametrize("frames", [1, 3])
def test_dciodvfy_finds_no_errors(tmp_path: Path, frames: int) -> None:
    samples = make_cine(2, frames, "head")
    path = tmp_path / "v.dcm"
    write_phantom(path, samples, transfer_syntax=JPEGBaseline8Bit)
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert not errors, errors
