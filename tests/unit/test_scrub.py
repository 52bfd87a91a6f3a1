"""Scrub: every planted identifier pixel goes, the image region stays bit-identical; header
de-identification per PS3.15 E.1-1; the guard fails closed."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut
from pydicom.sequence import Sequence as DicomSequence

from pipelines.frames import FrameMeta, UltrasoundRegion
from pipelines.phantom import PhantomSample, frame_meta, make_cine, make_phantom
from pipelines.phantom.dicom import phantom_dataset
from pipelines.scrub import (
    ScrubParams,
    UnscrubbedFrameError,
    apply_band,
    decide_band,
    deidentify,
    estimate_image_region,
    pseudonymous_patient_key,
    require_scrubbed,
    scrub_band,
)
from pipelines.scrub.profile_table import BASIC_PROFILE, action_for

from helpers import ultrasound_files

KEY = b"0123456789abcdef0123456789abcdef"
CASES = [(1, "head", "colour"), (2, "heart", "grey"), (3, "head", "grey"), (4, "heart", "colour")]


def _assert_scrubbed(sample: PhantomSample, out: np.ndarray) -> None:
    assert not out[sample.phi_mask].any(), "a planted identifier pixel survived"
    y0 = sample.region.y0
    assert np.array_equal(out[y0:], sample.annotated[y0:]), "the image region changed"


@pytest.mark.parametrize(("seed", "kind", "style"), CASES)
@pytest.mark.parametrize("with_regions", [True, False])
def test_detected_strip_removes_every_identifier_pixel(
    seed: int, kind: Any, style: Any, with_regions: bool
) -> None:
    sample = make_phantom(seed, kind, style=style)
    out, report = scrub_band(sample.annotated, frame_meta(sample, with_regions=with_regions))
    _assert_scrubbed(sample, out)
    assert report.method == "detected"
    assert report.region_source == ("header" if with_regions else "estimated")
    assert 0 < report.band_height <= sample.phi_band_height
    assert report.region_top is not None and report.region_top <= sample.region.y0
    assert np.array_equal(sample.annotated, make_phantom(seed, kind, style=style).annotated)


@pytest.mark.parametrize("with_regions", [True, False])
def test_configured_strip_per_manufacturer_and_model(with_regions: bool) -> None:
    sample = make_phantom(5, "head")
    meta = frame_meta(sample, with_regions=with_regions)
    for strips in (
        {("usfmd-phantom", "phantom-v1"): 40},
        {("USFMD-Phantom ", "*"): 40},  # case, padding and wildcard model
    ):
        out, report = scrub_band(sample.annotated, meta, ScrubParams(strips=strips))
        assert report.method == "configured" and report.band_height == 40 and not report.capped
        assert not out[:40].any()
        _assert_scrubbed(sample, out)
    other = ScrubParams(strips={("usfmd-phantom", "phantom-v2"): 40})
    assert scrub_band(sample.annotated, meta, other)[1].method == "detected"


def test_configured_strip_never_enters_the_header_region(caplog: pytest.LogCaptureFixture) -> None:
    sample = make_phantom(6, "heart")
    params = ScrubParams(strips={("usfmd-phantom", "*"): 200})
    with caplog.at_level(logging.WARNING):
        out, report = scrub_band(sample.annotated, frame_meta(sample), params)
    assert report.capped and report.band_height == sample.region.y0
    _assert_scrubbed(sample, out)
    assert "cut short" in caplog.text
    assert sample.patient.name not in caplog.text and sample.patient.patient_id not in caplog.text


def test_text_right_above_the_region_is_blanked_up_to_it_and_no_further() -> None:
    sample = make_phantom(8, "head")
    frame = sample.annotated.copy()
    y0 = sample.region.y0
    frame[y0 - 6 : y0, 300:500:3] = 255  # a text-like row pattern touching the region
    out, report = scrub_band(frame, frame_meta(sample))
    assert report.band_height == y0
    assert not out[:y0].any() and np.array_equal(out[y0:], frame[y0:])


def test_nothing_text_like_means_nothing_blanked() -> None:
    sample = make_phantom(9, "head", phi=False, style="none")
    for with_regions in (True, False):
        out, report = scrub_band(sample.annotated, frame_meta(sample, with_regions=with_regions))
        assert report.band_height == 0 and np.array_equal(out, sample.annotated)


def test_grey_frames_and_bad_input() -> None:
    sample = make_phantom(10, "head")
    grey = sample.annotated.max(axis=2)
    out, _ = scrub_band(grey, frame_meta(sample, with_regions=False))
    assert out.shape == grey.shape and not out[sample.phi_mask].any()
    with pytest.raises(ValueError, match="uint8"):
        scrub_band(grey.astype(np.float32), frame_meta(sample))
    with pytest.raises(ValueError, match="strip height"):
        ScrubParams(strips={("a", "b"): -1})


def test_estimated_region_covers_the_sector() -> None:
    for seed in range(6):
        sample = make_phantom(seed, "head" if seed % 2 else "heart")
        region = estimate_image_region(sample.annotated)
        r = sample.region
        assert region is not None
        assert region.x0 <= r.x0 and region.y0 <= r.y0 and region.x1 >= r.x1 and region.y1 >= r.y1
        assert r.y0 - region.y0 <= 10, "the estimate hugs the sector's first row"
    assert estimate_image_region(np.zeros((100, 100, 3), np.uint8)) is None


def test_header_region_outside_the_frame_is_not_trusted() -> None:
    sample = make_phantom(12, "head")
    wrong = UltrasoundRegion(0, 0, 2000, 2000, spatial_format=1, data_type=1)
    meta = dataclasses.replace(frame_meta(sample), regions=(wrong,))
    out, report = scrub_band(sample.annotated, meta)
    assert report.region_source == "estimated"
    _assert_scrubbed(sample, out)


def test_decide_once_apply_to_every_frame() -> None:
    cine = make_cine(14, 3, "heart")
    meta = frame_meta(cine[0], number_of_frames=3)
    decision = decide_band(cine[0].annotated, meta)
    assert decision.method == "detected" and decision.band_height > 0
    for index, sample in enumerate(cine):
        frame_meta_i = dataclasses.replace(meta, frame_index=index)
        frame = np.array(sample.annotated)
        out, report = apply_band(frame, frame_meta_i, decision, in_place=True)
        assert out is frame and report.frame_index == index
        assert report.band_height == decision.band_height and not out[sample.phi_mask].any()
        require_scrubbed(frame_meta_i, report)
        # Per-frame scrub_band decides the same on each frame of a loop.
        assert scrub_band(sample.annotated, frame_meta_i)[1] == report
    with pytest.raises(ValueError, match="decided for 600 x 800"):
        apply_band(np.zeros((10, 10, 3), np.uint8), meta, decision)


def test_detection_off_and_configured_strips_without_a_region() -> None:
    sample = make_phantom(15, "head")
    meta = frame_meta(sample, with_regions=False)
    with pytest.raises(ValueError, match="detection is off"):
        decide_band(sample.annotated, meta, detect=False)
    params = ScrubParams(strips={("usfmd-phantom", "*"): 40})
    decision = decide_band(sample.annotated, meta, params, detect=False)
    # A configured strip needs no region: none is estimated (it would only cost time).
    assert (decision.method, decision.band_height, decision.region_source) == (
        "configured",
        40,
        "none",
    )


def test_guard_fails_closed() -> None:
    sample = make_phantom(13, "head")
    meta = frame_meta(sample, sop_instance_uid="2.25.1", frame_index=2)
    with pytest.raises(UnscrubbedFrameError, match="not scrubbed"):
        require_scrubbed(meta, None)
    _, report = scrub_band(sample.annotated, meta)
    require_scrubbed(meta, report)
    other = dataclasses.replace(meta, frame_index=3)
    with pytest.raises(UnscrubbedFrameError, match="belongs to"):
        require_scrubbed(other, report)
    require_scrubbed(dataclasses.replace(meta, burned_in_annotation=False), None)


# --- header de-identification (PS3.15 Annex E) -------------------------------------------------


def _all_strings(ds: Dataset) -> list[str]:
    found: list[str] = []
    for elem in ds.iterall():
        if elem.VR in ("SQ", "OB", "OW", "UN") or elem.value is None:
            continue
        values = elem.value if isinstance(elem.value, list | tuple) else [elem.value]
        found.extend(str(v) for v in values)
    return found


@pytest.fixture(scope="module")
def source() -> tuple[PhantomSample, Dataset]:
    sample = make_phantom(21, "head")
    ds = phantom_dataset([sample])
    ds.OtherPatientIDsSequence = DicomSequence([Dataset()])
    ds.OtherPatientIDsSequence[0].PatientID = "OTHER-ID-42"
    ds.ReferencedImageSequence = DicomSequence([Dataset()])
    ref = ds.ReferencedImageSequence[0]
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    ds.add_new(0x00091010, "LO", "PRIVATE CREATOR")
    ds.add_new(0x00091001, "LO", sample.patient.name)
    ds.add_new(0x60003000, "OW", b"\x00\x01")  # overlay data
    ds.OperatorsName = "SONOGRAPHER^ANNA"
    return sample, ds


def test_deidentify_removes_names_ids_and_dates(source: tuple[PhantomSample, Dataset]) -> None:
    sample, ds = source
    before = ds.to_json_dict()
    out = deidentify(ds, KEY)
    assert ds.to_json_dict() == before, "the input dataset must not change"
    strings = " ".join(_all_strings(out))
    p = sample.patient
    for secret in (
        p.name,
        p.patient_id,
        p.birth_date,
        p.study_date,
        p.accession,
        p.institution,
        "OTHER-ID-42",
        "SONOGRAPHER",
        "REFERRER",
        "USFMD-PHANTOM",
    ):
        assert secret not in strings, secret
    assert not re.search(r"\b(?!19000101)(19|20)\d{6}\b", strings), "a date survived"
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert out.DeidentificationMethodCodeSequence[0].CodingSchemeDesignator == "DCM"
    assert len(out.DeidentificationMethod) <= 64
    assert out.BurnedInAnnotation == "YES"  # pixels untouched by header de-identification
    assert 0x00091001 not in out and 0x00091010 not in out and 0x60003000 not in out
    assert "OtherPatientIDsSequence" not in out and "StudyDescription" not in out
    assert out.PatientID == pseudonymous_patient_key(p.patient_id, "USFMD-PHANTOM", KEY)
    assert out.Manufacturer == ds.Manufacturer and out.Rows == ds.Rows  # kept
    assert out.PixelData == ds.PixelData


def test_deidentified_uids_are_new_valid_and_consistent(
    source: tuple[PhantomSample, Dataset], tmp_path: Path
) -> None:
    _, ds = source
    a, b = deidentify(ds, KEY), deidentify(ds, KEY)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        new = a[keyword].value
        assert new != ds[keyword].value and new == b[keyword].value
        assert pydicom.uid.UID(new).is_valid and len(new) <= 64
    assert a.SOPClassUID == ds.SOPClassUID
    ref = a.ReferencedImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == a.SOPInstanceUID  # references follow their target
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    other_key = deidentify(ds, b"another key of at least sixteen bytes")
    assert other_key.StudyInstanceUID != a.StudyInstanceUID
    # Another instance of the same study maps to the same new study, a new instance UID.
    second = phantom_dataset([source[0]], instance_number=2)
    c = deidentify(second, KEY)
    assert c.StudyInstanceUID == a.StudyInstanceUID and c.SOPInstanceUID != a.SOPInstanceUID
    path = tmp_path / "deid.dcm"
    a.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.PatientIdentityRemoved == "YES" and back.SOPInstanceUID == a.SOPInstanceUID
    assert np.array_equal(back.pixel_array, source[0].annotated)


def test_deidentify_options_and_key_checks(source: tuple[PhantomSample, Dataset]) -> None:
    _, ds = source
    cleaned = deidentify(ds, KEY, pixels_cleaned=True)
    codes = [item.CodeValue for item in cleaned.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113101"] and cleaned.BurnedInAnnotation == "NO"
    kept_dates = deidentify(ds, KEY, clean_all_dates=False)
    assert kept_dates.InstanceCreationDate == ds.InstanceCreationDate  # not in Table E.1-1
    assert deidentify(ds, KEY).InstanceCreationDate in (None, "")
    with pytest.raises(ValueError, match="at least 16"):
        deidentify(ds, b"short")


def test_pseudonymous_patient_key_is_stable_and_keyed() -> None:
    key = pseudonymous_patient_key("PH123", "HOSP", KEY)
    assert key == pseudonymous_patient_key(" PH123 ", "HOSP ", KEY)
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    assert key != pseudonymous_patient_key("PH124", "HOSP", KEY)
    assert key != pseudonymous_patient_key("PH123", "OTHER", KEY)
    assert key != pseudonymous_patient_key("PH123", "HOSP", b"z" * 32)
    assert len(pseudonymous_patient_key("PH123", "", KEY, length=32)) == 32
    with pytest.raises(ValueError):
        pseudonymous_patient_key("PH123", "", KEY, length=4)


def test_profile_table_is_the_standard_table() -> None:
    assert len(BASIC_PROFILE) > 400
    expected = {
        "PatientName": "Z",
        "PatientID": "Z",
        "PatientBirthDate": "Z",
        "StudyInstanceUID": "U",
        "SOPInstanceUID": "U",
        "PatientAddress": "X",
        "InstitutionName": "X/Z/D",
        "ContentDate": "Z/D",
        "ReferencedImageSequence": "X/Z/U*",
    }
    for keyword, action in expected.items():
        assert action_for(pydicom.datadict.tag_for_keyword(keyword) or 0) == action, keyword
    assert action_for(0x00291010) == "X" and action_for(0x60023000) == "X"
    assert action_for(0x50001010) == "X"
    assert action_for(0x00280010) is None  # Rows: not identifying, kept


# --- the real corpus ---------------------------------------------------------------------------


def _rgb_first_frame(path: Path) -> tuple[Dataset, np.ndarray]:
    ds = pydicom.dcmread(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    arr = pydicom.pixels.pixel_array(ds, index=0) if frames > 1 else ds.pixel_array
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.dtype != np.uint8:
        arr = (arr >> 8).astype(np.uint8) if arr.max() > 255 else arr.astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return ds, arr


def _regions(ds: Dataset) -> tuple[UltrasoundRegion, ...]:
    return tuple(
        UltrasoundRegion(
            int(item.RegionLocationMinX0),
            int(item.RegionLocationMinY0),
            int(item.RegionLocationMaxX1),
            int(item.RegionLocationMaxY1),
            spatial_format=int(item.get("RegionSpatialFormat", 0)),
        )
        for item in ds.get("SequenceOfUltrasoundRegions") or ()
    )


CORPUS = (
    "OBXXXX1A.dcm",
    "US1_UNCR.dcm",
    "gdcm-US-ALOKA-16.dcm",
    "color3d_jpeg_baseline.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "examples_ybr_color.dcm",
)


@pytest.mark.filterwarnings("ignore:Expected explicit VR")
@pytest.mark.parametrize("name", CORPUS)
def test_real_files_scrub_without_touching_their_region(name: str) -> None:
    (path,) = [p for p in ultrasound_files() if p.name == name]
    ds, frame = _rgb_first_frame(path)
    meta = FrameMeta(
        sop_instance_uid=str(ds.SOPInstanceUID),
        frame_index=0,
        number_of_frames=int(ds.get("NumberOfFrames", 1) or 1),
        rows=frame.shape[0],
        columns=frame.shape[1],
        photometric_interpretation=str(ds.PhotometricInterpretation),
        manufacturer=str(ds.get("Manufacturer", "")),
        model_name=str(ds.get("ManufacturerModelName", "")),
        regions=_regions(ds),
    )
    out, report = scrub_band(frame, meta)
    assert out.shape == frame.shape and report.band_height <= frame.shape[0]
    region = meta.image_region()
    if region is not None and region.within(*frame.shape[:2]):
        assert report.region_source == "header"
        assert np.array_equal(out[region.y0 :], frame[region.y0 :])
    print(f"{name}: {report.method} band {report.band_height} rows, region {report.region_source}")
    require_scrubbed(meta, report)
    deidentify(ds, KEY)  # real headers de-identify without error
