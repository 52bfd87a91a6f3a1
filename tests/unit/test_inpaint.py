"""Inpaint: planted calipers and text are found (recall), bone and tissue are not (precision),
everything outside the mask is bit-identical, and the filled pixels resemble the clean phantom."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_color_lut

from pipelines.inpaint import InpaintParams, annotation_mask, bright_mark_mask, inpaint
from pipelines.phantom import PhantomSample, make_phantom

from helpers import ultrasound_files

#: Head and heart phantoms ("other" view: no colour flow) in both caliper styles.
CASES = [
    (seed, kind, style)
    for seed, (kind, style) in enumerate(
        [("head", "colour"), ("head", "grey"), ("heart", "colour"), ("heart", "grey")] * 2
    )
]


def _sample(seed: int, kind: Any, style: Any) -> PhantomSample:
    return make_phantom(seed, kind, style=style, phi=False, heart_view="other")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def _dilate(mask: np.ndarray, size: int) -> np.ndarray:
    return cv2.dilate(mask.astype(np.uint8), np.ones((size, size), np.uint8)) > 0


@pytest.mark.parametrize(("seed", "kind", "style"), CASES)
def test_planted_marks_are_found_and_filled(seed: int, kind: Any, style: Any) -> None:
    sample = _sample(seed, kind, style)
    out, mask = inpaint(sample.annotated)
    planted = sample.annotation_mask
    # A white caliper on saturated bone is the bone's own colour: nothing can find it, nothing
    # needs filling there. Recall is scored on marks off the skull and spine.
    off_bone = planted & ~_dilate(sample.bone_mask, 5)
    recall = (mask & planted).sum() / planted.sum()
    recall_off_bone = (mask & off_bone).sum() / off_bone.sum()
    psnr_before = _psnr(sample.annotated[planted], sample.clean[planted])
    psnr_after = _psnr(out[planted], sample.clean[planted])
    print(
        f"{kind}/{style} seed {seed}: recall {recall:.4f} (off bone {recall_off_bone:.4f}), "
        f"PSNR on marks {psnr_before:.1f} -> {psnr_after:.1f} dB, mask {mask.sum()} px"
    )
    assert recall_off_bone >= 0.98
    if style == "colour":
        assert recall >= 0.98
    assert psnr_after >= 20.0 and psnr_after > psnr_before + 15
    # Only masked pixels change, bit for bit.
    assert np.array_equal(out[~mask], sample.annotated[~mask])
    # Precision: bone and tissue away from any mark stay unmasked.
    far = ~_dilate(planted, 15)
    assert (mask & far & sample.bone_mask).sum() <= 0.01 * sample.bone_mask.sum()
    assert (mask & far).sum() <= 0.002 * sample.fan_mask.sum()


def test_clean_phantoms_have_next_to_nothing_to_inpaint() -> None:
    for seed in range(4):
        sample = make_phantom(seed, "head" if seed % 2 else "heart", heart_view="other")
        mask = annotation_mask(sample.clean)
        # At most a few specks where the bright skin line meets the black background.
        assert mask.sum() <= 0.004 * sample.fan_mask.sum(), f"seed {seed}: {mask.sum()} px"
        assert not (mask & sample.bone_mask).any()


def test_bright_bone_like_ellipse_is_not_masked_but_a_cross_beside_it_is() -> None:
    rng = np.random.default_rng(0)
    tissue = rng.normal(100, 30, (300, 400)).clip(0, 255)
    tissue = cv2.GaussianBlur(tissue, (0, 0), 1.0)
    bone = np.zeros((300, 400), np.uint8)
    cv2.ellipse(bone, (200, 150), (150, 100), 15, 0, 360, 1, 12)  # a skull: thick bright ring
    cv2.ellipse(bone, (120, 150), (25, 18), 0, 0, 360, 1, -1)  # a solid bright blob
    speckled = np.clip(rng.normal(235, 25, (300, 400)), 0, 255)
    grey = np.where(bone > 0, speckled, tissue).astype(np.uint8)
    frame = np.repeat(grey[..., None], 3, axis=2)
    cross = np.zeros((300, 400), np.uint8)
    for image, value in ((frame, (255, 255, 255)), (cross, 255)):
        cv2.line(image, (265, 150), (275, 150), value, 1)
        cv2.line(image, (270, 145), (270, 155), value, 1)
    mask = annotation_mask(frame)
    assert (mask & (bone > 0)).sum() <= 0.005 * (bone > 0).sum()
    assert mask[cross > 0].all()


def test_colour_flow_can_be_kept_for_doppler_tasks() -> None:
    sample = make_phantom(31, "heart", heart_view="x_sign", phi=False)
    flow = sample.flow_mask
    _, paper = inpaint(sample.annotated)
    assert paper[flow].mean() > 0.9  # the papers' method takes every saturated pixel
    out, kept = inpaint(sample.annotated, InpaintParams(colour_flow_min_area=200))
    untouched = flow & ~_dilate(sample.annotation_mask, 9)
    assert not kept[untouched].any() and np.array_equal(out[untouched], sample.annotated[untouched])
    assert (kept & sample.annotation_mask).sum() >= 0.95 * sample.annotation_mask.sum()


def test_grey_input_and_parameter_checks() -> None:
    sample = _sample(3, "head", "grey")
    grey = sample.annotated.max(axis=2)
    out, mask = inpaint(grey)
    assert out.shape == grey.shape and mask.any()
    assert np.array_equal(out[~mask], grey[~mask])
    assert not bright_mark_mask(np.zeros((50, 50, 3), np.uint8)).any()
    with pytest.raises(ValueError, match="odd"):
        InpaintParams(background_kernel=8)
    with pytest.raises(ValueError, match="saturation_floor"):
        InpaintParams(saturation_floor=200, saturation_ceiling=100)
    with pytest.raises(ValueError, match="channels"):
        inpaint(np.zeros((10, 10, 4), np.uint8))


def _first_frame(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    arr = pydicom.pixels.pixel_array(ds, index=0) if frames > 1 else ds.pixel_array
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.dtype != np.uint8:  # 16-bit palette entries
        arr = arr >> 8 if arr.max() > 255 else arr
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.asarray(arr, dtype=np.uint8)


@pytest.mark.filterwarnings("ignore:Expected explicit VR")
@pytest.mark.parametrize("name", ["OBXXXX1A.dcm", "US1_UNCR.dcm", "color3d_jpeg_baseline.dcm"])
def test_real_files_inpaint(name: str) -> None:
    (path,) = [p for p in ultrasound_files() if p.name == name]
    frame = _first_frame(path)
    out, mask = inpaint(frame)
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert np.array_equal(out[~mask], frame[~mask])
    print(f"{name}: {mask.mean():.2%} of the frame inpainted")
    assert 0 < mask.mean() < 0.25
