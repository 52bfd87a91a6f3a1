"""Secondary Capture heatmaps: pixels, legend, text, DICOM round trip and dciodvfy."""

from __future__ import annotations

import datetime
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from pipelines.decode import iter_frames
from pipelines.phantom import make_phantom
from pipelines.phantom.dicom import phantom_dataset
from pipelines.report import (
    NOT_VERIFIED,
    SYNTHETIC_BANNER,
    Algorithm,
    ImageFinding,
    SourceImage,
    build_heatmap_sc,
    colorize,
    derive_uid,
    heatmap_text,
    render_heatmap,
)
from pipelines.report.validate import DCIODVFY, dciodvfy
from pipelines.tasks import get_task

from helpers import ultrasound_files

VM = get_task("ventriculomegaly")
HEART = get_task("heart_view")
WHEN = datetime.datetime(2025, 3, 4, 5, 6, 7)
needs_dciodvfy = pytest.mark.skipif(not DCIODVFY.exists(), reason="dicom3tools not installed")
SYNTHETIC = Algorithm(
    "tiny-vit vm synthetic demo",
    "0.1",
    "usfmd",
    derive_uid("device", "tiny", "0.1"),
    synthetic=True,
)
REAL = Algorithm("usf-mae-vit-b16 heart view", "1.4.0", "usfmd", derive_uid("device", "hv", "1"))


def _blob(rows: int, columns: int, cy: float, cx: float, sigma: float) -> NDArray[np.float64]:
    """A Gaussian hot spot: the shape Eigen-CAM gives a ViT looking at one structure."""
    yy, xx = np.mgrid[:rows, :columns]
    return np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)))


def _noise(rows: int, columns: int, seed: int = 0) -> NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, (rows, columns, 3), dtype=np.uint8)


def _real(name: str) -> Path:
    return next(p for p in ultrasound_files() if p.name == name)


def _build(finding: ImageFinding, algorithm: Algorithm, frame: Any, cam: Any, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "series_instance_uid": derive_uid("sc-series", algorithm.device_uid),
        "series_number": 902,
        "sop_instance_uid": derive_uid(
            "sc", algorithm.device_uid, finding.source.sop_instance_uid, str(finding.reported_frame)
        ),
        "created": WHEN,
    }
    args.update(kw)
    return build_heatmap_sc(finding, algorithm, frame, cam, **args)


def _assert_valid(path: Path) -> None:
    verdict = dciodvfy(path)
    for line in verdict.warnings:
        print(f"dciodvfy {path.name}: {line}")
    assert verdict.errors == (), verdict.errors


# --- pixels -----------------------------------------------------------------------------------


def test_only_hot_pixels_change_in_the_frame() -> None:
    frame = _noise(180, 400)
    cam = _blob(180, 400, 90, 250, 30)
    out, layout = render_heatmap(frame, cam, ["Finding p=0.93", NOT_VERIFIED], floor=0.2)

    assert (layout.frame_rows, layout.frame_columns) == (180, 400)
    assert out.shape == (layout.rows, layout.columns, 3) and layout.rows > 180
    region = out[:180, :400]
    changed = np.any(region != frame, axis=2)
    assert not changed[cam <= 0.2].any(), "a cold pixel changed"
    assert changed[cam >= 0.5].mean() > 0.99, "a hot pixel kept its value"
    # The hottest pixel is pulled halfway (alpha 0.5) to the map's top colour.
    top = colorize(np.array([1.0]))[0].astype(int)
    y, x = np.unravel_index(np.argmax(cam), cam.shape)
    expected = np.rint((frame[y, x].astype(float) + top) / 2)
    assert np.abs(region[y, x] - expected).max() <= 1

    band = out[180:]
    assert band.any(), "the text band is empty"


def test_legend_is_the_colour_map_from_0_to_1() -> None:
    out, layout = render_heatmap(_noise(200, 500), _blob(200, 500, 100, 100, 20), ["x p=0.50"])
    top, bottom, left, right = layout.legend
    assert top >= layout.frame_rows and right - left >= 64
    bar = out[top:bottom, left:right].astype(int)
    assert (bar == bar[0]).all(), "every row of the bar is the same ramp"
    ramp = colorize(np.linspace(0.0, 1.0, right - left)).astype(int)
    assert np.array_equal(bar[0], ramp)
    assert np.array_equal(bar[0, 0], colorize(np.array([0.0]))[0])
    assert np.array_equal(bar[0, -1], colorize(np.array([1.0]))[0])
    # "0" left of the bar and "1" right of it: white text pixels on both sides, same rows.
    assert (out[top:bottom, left - 12 : left] > 200).any()
    assert (out[top:bottom, right : right + 24] > 200).any()


def test_tiny_frame_gets_a_legible_band() -> None:
    frame = _noise(40, 48)
    out, layout = render_heatmap(frame, np.zeros((40, 48)), ["Ventriculomegaly p=0.93"])
    assert layout.columns >= 320
    assert np.array_equal(out[:40, :48], frame), "a cold map leaves the frame untouched"
    assert not out[:40, 48:].any(), "padding right of a narrow frame stays black"


def test_synthetic_banner_and_text() -> None:
    source = SourceImage.from_dataset(phantom_dataset([make_phantom(5, "head")]))
    finding = ImageFinding(
        source, VM, "ventriculomegaly", 0.934, {"normal": 0.066, "ventriculomegaly": 0.934}
    )
    banner, lines = heatmap_text(finding, SYNTHETIC)
    assert banner == SYNTHETIC_BANNER
    assert lines[0] == "Ventriculomegaly (atrium >= 10 mm) p=0.93"
    assert NOT_VERIFIED in lines
    assert heatmap_text(finding, REAL)[0] is None

    frame, cam = _noise(source.rows, source.columns), _blob(source.rows, source.columns, 50, 50, 9)
    with_banner, layout = render_heatmap(frame, cam, lines, banner=banner)
    without, plain = render_heatmap(frame, cam, lines)

    def amber(image: NDArray[np.uint8], top: int) -> bool:
        text = image[source.rows : top]  # the text rows, above the legend's yellow end
        return bool(((text[..., 0] > 200) & (text[..., 1] > 120) & (text[..., 2] < 60)).any())

    assert amber(with_banner, layout.legend[0]), "the synthetic warning is drawn in amber"
    assert not amber(without, plain.legend[0])
    assert layout.rows > plain.rows, "the banner is a line of its own"


@pytest.mark.parametrize(
    ("frame", "cam", "kwargs", "message"),
    [
        (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8)), {}, "uint8"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8)), {}, "\\(rows, columns, 3\\)"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9)), {}, "differs from the frame's"),
        (np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 1.5), {}, "must lie in \\[0, 1\\]"),
        (np.zeros((8, 8, 3), np.uint8), np.full((8, 8), np.nan), {}, "NaN"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.int64), {}, "float"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)), {"alpha": 0.0}, "alpha"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)), {"colormap": "jet"}, "colormap 'jet'"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)), {"lines": ["p=0.9 \u2265"]}, "ASCII"),
    ],
)
def test_render_rejects(frame: Any, cam: Any, kwargs: dict[str, Any], message: str) -> None:
    lines = kwargs.pop("lines", ["x"])
    with pytest.raises(ValueError, match=message):
        render_heatmap(frame, cam, lines, **kwargs)


# --- DICOM ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom() -> Dataset:
    return phantom_dataset([make_phantom(7, "head", atrial_width_mm=12.5)])


@needs_dciodvfy
def test_phantom_heatmap_round_trip(tmp_path: Path, phantom: Dataset) -> None:
    source = SourceImage.from_dataset(phantom)
    finding = ImageFinding(
        source, VM, "ventriculomegaly", 0.93, {"normal": 0.07, "ventriculomegaly": 0.93}
    )
    frame, _ = next(iter_frames(phantom))
    cam = _blob(source.rows, source.columns, 260, 380, 50)
    sc = _build(finding, SYNTHETIC, frame, cam)
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)

    assert back.SOPClassUID == SecondaryCaptureImageStorage
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3
    assert back.BurnedInAnnotation == "YES" and back.ConversionType == "WSD"
    assert back.Manufacturer == "usfmd"
    assert back.StudyInstanceUID == phantom.StudyInstanceUID
    assert back.SeriesInstanceUID != phantom.SeriesInstanceUID and back.SeriesNumber == 902
    assert back.PatientName == phantom.PatientName and back.PatientID == phantom.PatientID
    assert back.LossyImageCompression == "00"  # the phantom is stored uncompressed
    [ref] = back.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == phantom.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == phantom.SOPClassUID
    assert "ReferencedFrameNumber" not in ref  # a single-frame source
    [ours] = [e for e in back.ContributingEquipmentSequence if "DeviceUID" in e]
    assert ours.DeviceUID == SYNTHETIC.device_uid
    assert SYNTHETIC_BANNER in back.ImageComments

    pixels = back.pixel_array
    region = pixels[: source.rows, : source.columns]
    changed = np.any(region != frame, axis=2)
    assert not changed[cam <= 0.2].any()
    assert changed[cam >= 0.5].mean() > 0.95  # the phantom has flat black where blending is a no-op
    assert pixels.shape[0] > source.rows
    _assert_valid(path)


@needs_dciodvfy
@pytest.mark.parametrize("name", ["examples_ybr_color.dcm", "US1_UNCR.dcm", "OBXXXX1A_2frame.dcm"])
def test_real_file_heatmap(tmp_path: Path, name: str) -> None:
    header = pydicom.dcmread(_real(name), stop_before_pixels=True)
    multi = int(header.get("NumberOfFrames") or 1) > 1
    best = 2 if multi else None
    source = SourceImage.from_dataset(header)
    probs = {"aorta": 0.1, "atrioventricular_flows": 0.1, "v_sign": 0.6, "x_sign": 0.1}
    probs["other"] = 0.1
    finding = ImageFinding(
        source, HEART, "v_sign", 0.6, probs, best_frame=best, aggregation="mean" if multi else None
    )
    frame, _ = next(iter_frames(_real(name), indices=[(best or 1) - 1]))
    cam = _blob(source.rows, source.columns, source.rows / 2, source.columns / 2, source.rows / 6)
    path = tmp_path / "sc.dcm"
    _build(finding, REAL, frame, cam).save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)

    [ref] = back.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == header.SOPInstanceUID
    # OBXXXX1A_2frame holds 2 frames in the single-frame US Image class: no frame number then.
    assert ref.get("ReferencedFrameNumber") == (2 if name == "examples_ybr_color.dcm" else None)
    if best is not None:
        assert f"frame {best} of the source" in back.DerivationDescription
    assert back.StudyInstanceUID == header.StudyInstanceUID
    assert back.PatientName == header.PatientName
    # JPEG-stored cines stay flagged lossy in what is derived from them (PS3.3 C.7.6.1.1.5).
    lossy = header.file_meta.TransferSyntaxUID.is_compressed and name == "examples_ybr_color.dcm"
    assert back.LossyImageCompression == ("01" if lossy else "00")
    region = back.pixel_array[: source.rows, : source.columns]
    assert np.array_equal(region[cam <= 0.2], frame[cam <= 0.2])
    _assert_valid(path)


@needs_dciodvfy
@pytest.mark.parametrize("path", ultrasound_files(), ids=lambda p: p.name)
def test_every_corpus_file(tmp_path: Path, path: Path) -> None:
    """Every US file of pydicom and pydicom-data, decoded by the pipeline's own decoder."""
    header = pydicom.dcmread(path, stop_before_pixels=True)
    source = SourceImage.from_dataset(header)
    multi = source.is_multiframe
    probs = {n: 0.2 for n in HEART.class_names}
    finding = ImageFinding(
        source, HEART, "other", 0.2, probs, best_frame=1 if multi else None,
        aggregation="mean" if multi else None,
    )  # fmt: skip
    frame, _ = next(iter_frames(path, indices=[0]))
    cam = _blob(source.rows, source.columns, source.rows / 3, source.columns / 3, source.rows / 5)
    out = tmp_path / "sc.dcm"
    _build(finding, REAL, frame, cam).save_as(out, enforce_file_format=True)
    back = pydicom.dcmread(out)

    region = back.pixel_array[: source.rows, : source.columns]
    assert np.array_equal(region[cam <= 0.2], frame[cam <= 0.2])
    assert back.SourceImageSequence[0].ReferencedSOPClassUID == header.SOPClassUID
    # The source's own UIDs are repeated as they are, even with an illegal root (color-pl.dcm).
    uids = (header.StudyInstanceUID, header.SOPInstanceUID)
    errors = [e for e in dciodvfy(out).errors if not any(f'"{u}"' in e for u in uids)]
    assert errors == []


def test_rebuild_is_identical(phantom: Dataset) -> None:
    source = SourceImage.from_dataset(phantom)
    finding = ImageFinding(source, VM, "normal", 0.8, {"normal": 0.8, "ventriculomegaly": 0.2})
    frame, _ = next(iter_frames(phantom))
    cam = _blob(source.rows, source.columns, 100, 100, 20)

    def encoded() -> tuple[str, bytes]:
        sc = _build(finding, SYNTHETIC, frame, cam)
        buffer = io.BytesIO()
        sc.save_as(buffer, enforce_file_format=True)
        return sc.SOPInstanceUID, buffer.getvalue()

    assert encoded() == encoded()


def test_heatmap_rejects(phantom: Dataset) -> None:
    source = SourceImage.from_dataset(phantom)
    finding = ImageFinding(source, VM, "normal", 0.8, {"normal": 0.8, "ventriculomegaly": 0.2})
    frame = np.zeros((source.rows, source.columns, 3), np.uint8)
    cam = np.zeros((source.rows, source.columns))
    with pytest.raises(ValueError, match="pass the frame on its original pixel grid"):
        _build(finding, SYNTHETIC, frame[:-1], cam[:-1])
    with pytest.raises(ValueError, match="is the source's series"):
        _build(finding, SYNTHETIC, frame, cam, series_instance_uid=phantom.SeriesInstanceUID)
    with pytest.raises(ValueError, match="sop_instance_uid .* source image's UID"):
        _build(finding, SYNTHETIC, frame, cam, sop_instance_uid=phantom.SOPInstanceUID)


def test_no_patient_data_in_logs_or_warnings(
    caplog: pytest.LogCaptureFixture, phantom: Dataset
) -> None:
    header = pydicom.dcmread(_real("US1_UNCR.dcm"), stop_before_pixels=True)
    header.PatientName = "Dupont"
    header.ReferringPhysicianName = "Martin"
    source = SourceImage.from_dataset(header)
    probs = {n: 0.2 for n in HEART.class_names}
    finding = ImageFinding(source, HEART, "other", 0.2, probs)
    frame = _noise(source.rows, source.columns)
    cam = _blob(source.rows, source.columns, 40, 40, 10)
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sc = _build(finding, REAL, frame, cam)
    assert sc.PatientName == "Dupont" and sc.ReferringPhysicianName == "Martin"
    assert caplog.records
    said = caplog.text + "\n".join(str(w.message) for w in caught)
    for secret in ("Dupont", "Martin", str(header.PatientID)):
        assert secret not in said
