"""TID 1500 SR from real ultrasound headers: written, read back, checked by dciodvfy, dsrdump."""

from __future__ import annotations

import datetime
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, UltrasoundMultiFrameImageStorage, generate_uid

from pipelines.phantom import make_cine, make_phantom
from pipelines.phantom.dicom import phantom_dataset
from pipelines.report import (
    Algorithm,
    ImageFinding,
    SourceImage,
    build_sr,
    derive_uid,
    tracking_uid,
)
from pipelines.report.validate import DCIODVFY, DSRDUMP, dciodvfy, dsrdump
from pipelines.tasks import USFMD_SCHEME, get_task

from helpers import ultrasound_files

VM = get_task("ventriculomegaly")
HEART = get_task("heart_view")
WHEN = datetime.datetime(2025, 3, 4, 5, 6, 7)
needs_dciodvfy = pytest.mark.skipif(not DCIODVFY.exists(), reason="dicom3tools not installed")
needs_dsrdump = pytest.mark.skipif(not DSRDUMP.exists(), reason="dcmtk not installed")


def _real(name: str) -> Path:
    return next(p for p in ultrasound_files() if p.name == name)


@pytest.fixture(scope="module")
def still() -> Dataset:
    return phantom_dataset([make_phantom(7, "head", atrial_width_mm=12.5)])


@pytest.fixture(scope="module")
def cine() -> Dataset:
    # Same seed: the same invented patient and study, another series.
    return phantom_dataset(make_cine(7, 3, "head", atrial_width_mm=8.0), series_number=2)


@pytest.fixture(scope="module")
def algorithm() -> Algorithm:
    return Algorithm(
        name="usf-mae-vit-b16 vm synthetic demo",
        version="2025.03-1",
        manufacturer="usfmd project",
        device_uid=derive_uid("device", "ventriculomegaly", "2025.03-1"),
        parameters={"threshold": 0.5, "input_size": 224, "tta": False},
        synthetic=True,
    )


def _vm(source: SourceImage, p_vm: float, **kw: Any) -> ImageFinding:
    name = "ventriculomegaly" if p_vm >= 0.5 else "normal"
    probs = {"normal": round(1 - p_vm, 6), "ventriculomegaly": p_vm}
    return ImageFinding(source, VM, name, probs[name], probs, **kw)


def _build(
    findings: list[ImageFinding], algorithm: Algorithm, **kw: Any
) -> hd.sr.Comprehensive3DSR:
    study = findings[0].source.study_instance_uid
    args: dict[str, Any] = {
        "series_instance_uid": derive_uid("sr-series", study, algorithm.device_uid),
        "series_number": 901,
        "sop_instance_uid": derive_uid("sr", study, algorithm.device_uid),
        "created": WHEN,
    }
    args.update(kw)
    return build_sr(findings, algorithm, **args)


def _write(ds: Dataset, path: Path) -> Dataset:
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def _assert_valid(path: Path) -> None:
    verdict = dciodvfy(path)
    for line in verdict.warnings:
        print(f"dciodvfy {path.name}: {line}")
    assert verdict.errors == (), verdict.errors


def _groups(path: Path) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    sr = hd.sr.srread(path)
    return list(sr.content.get_image_measurement_groups())


def _content(sr: Dataset) -> hd.sr.MeasurementReport:
    return hd.sr.Comprehensive3DSR.from_dataset(sr).content


def _children(group: hd.sr.MeasurementsAndQualitativeEvaluations, code: Any) -> list[Dataset]:
    """Direct children of a measurement group's container with the given concept name."""
    return [
        item
        for item in group[0].ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == code.value
    ]


def _text(group: hd.sr.MeasurementsAndQualitativeEvaluations, code: Any) -> list[str]:
    return [item.TextValue for item in _children(group, code)]


def _our_equipment(ds: Dataset) -> Dataset:
    items = [
        item
        for item in ds.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
    ]
    assert len(items) == 1
    return items[0]


@needs_dciodvfy
@needs_dsrdump
def test_phantom_study_round_trip(
    tmp_path: Path, still: Dataset, cine: Dataset, algorithm: Algorithm
) -> None:
    single = _vm(SourceImage.from_dataset(still), 0.93)
    whole_cine = _vm(SourceImage.from_dataset(cine), 0.12, best_frame=2, aggregation="mean")
    path = tmp_path / "sr.dcm"
    back = _write(_build([whole_cine, single], algorithm), path)

    # It joins the source study, in a new series, as the same patient; unverified.
    assert back.SOPClassUID == Comprehensive3DSRStorage and back.Modality == "SR"
    assert back.StudyInstanceUID == still.StudyInstanceUID
    assert back.SeriesInstanceUID not in (still.SeriesInstanceUID, cine.SeriesInstanceUID)
    assert back.SeriesNumber == 901
    assert back.PatientName == still.PatientName and back.PatientID == still.PatientID
    assert back.AccessionNumber == still.AccessionNumber
    assert back.VerificationFlag == "UNVERIFIED" and back.Manufacturer == "usfmd"
    assert back.ContentDate == "20250304" and back.ContentTime == "050607"

    # Every source image is evidence (0040,A375), under its own series.
    evidence = {
        ref.ReferencedSOPInstanceUID: series.SeriesInstanceUID
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {
        still.SOPInstanceUID: still.SeriesInstanceUID,
        cine.SOPInstanceUID: cine.SeriesInstanceUID,
    }

    # Contributing Equipment: the model version with its Device UID (IHE AIR purpose code).
    ours = _our_equipment(back)
    assert ours.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"
    assert ours.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
    assert ours.Manufacturer == algorithm.manufacturer
    assert ours.ManufacturerModelName == algorithm.name
    assert ours.SoftwareVersions == algorithm.version
    assert ours.DeviceUID == algorithm.device_uid
    schemes = {item.CodingSchemeDesignator for item in back.CodingSchemeIdentificationSequence}
    assert {USFMD_SCHEME, "99IHE"} <= schemes

    # Content tree: groups sorted by series, each with finding, probabilities, algorithm, source.
    groups = _groups(path)
    assert len(groups) == 2
    by_source = {g.source_images[0].referenced_sop_instance_uid: g for g in groups}
    g_still, g_cine = by_source[still.SOPInstanceUID], by_source[cine.SOPInstanceUID]
    assert g_still.tracking_uid == tracking_uid(single)
    assert g_still.tracking_identifier == "ventriculomegaly image 1"
    [evaluation] = g_still.get_qualitative_evaluations()
    assert evaluation.name.value == VM.finding.value
    assert evaluation.value.value == "VM-VM" and evaluation.value.scheme_designator == "99USFMD"
    first, second = g_still.get_measurements(name=codes.DCM.Probability)
    assert (first.value, first.unit.value) == (0.93, "{ratio}")
    assert first[0].ContentSequence[0].ConceptCodeSequence[0].CodeValue == "VM-VM"
    assert second.value == pytest.approx(0.07)
    assert second[0].ContentSequence[0].ConceptCodeSequence[0].CodeValue == "17621005"
    assert _text(g_still, codes.DCM.AlgorithmName) == [algorithm.name]
    assert _text(g_still, codes.DCM.AlgorithmVersion) == [algorithm.version]
    assert "threshold=0.5" in _text(g_still, codes.DCM.AlgorithmParameters)
    assert g_still.source_images[0].referenced_frame_numbers is None

    [evaluation] = g_cine.get_qualitative_evaluations()
    assert evaluation.value.meaning == "Normal"
    assert g_cine.get_measurements(name=codes.DCM.Probability)[0].value == 0.88
    params = _text(g_cine, codes.DCM.AlgorithmParameters)
    assert "aggregation=mean" in params and "frames=3" in params
    [best] = _children(g_cine, codes.DCM.BestIllustrationOfFinding)
    assert best.ReferencedSOPSequence[0].ReferencedFrameNumber == 2

    _assert_valid(path)
    rendering, diagnostics = dsrdump(path)
    assert diagnostics == ()
    assert '(VM-VM,99USFMD,"Ventriculomegaly (atrium >= 10 mm)")' in rendering
    assert '(122157,DCM,"Probability")="0.93"' in rendering
    assert "Verification Flag   : UNVERIFIED" in rendering


@needs_dciodvfy
@needs_dsrdump
@pytest.mark.parametrize(
    ("name", "frame"), [("examples_ybr_color.dcm", 11), ("OBXXXX1A_2frame.dcm", 2)]
)
def test_real_cine_from_pydicom_data(tmp_path: Path, name: str, frame: int) -> None:
    """SonoSite's 30-frame JPEG cine (lax patient name, private tags) and Philips' 2 frames in
    the single-frame US Image class, where no Referenced Frame Number is allowed."""
    header = pydicom.dcmread(_real(name), stop_before_pixels=True)
    algorithm = Algorithm(
        "usf-mae-vit-b16 heart view", "1.4.0", "usfmd", derive_uid("device", "heart", "1.4.0")
    )
    probs = {"aorta": 0.05, "atrioventricular_flows": 0.1, "v_sign": 0.05, "x_sign": 0.7}
    probs["other"] = 0.1
    one_frame = ImageFinding(SourceImage.from_dataset(header, frame), HEART, "x_sign", 0.7, probs)
    path = tmp_path / "sr.dcm"
    back = _write(_build([one_frame], algorithm, series_number=5), path)

    assert back.StudyInstanceUID == header.StudyInstanceUID
    assert back.PatientName == header.PatientName
    [group] = _groups(path)
    multiframe_class = header.SOPClassUID == UltrasoundMultiFrameImageStorage
    assert group.source_images[0].referenced_frame_numbers == (
        [frame] if multiframe_class else None
    )
    assert group.get_qualitative_evaluations()[0].value.meaning == "X sign view"
    assert [m.value for m in group.get_measurements()] == [0.7, 0.05, 0.1, 0.05, 0.1]
    assert _our_equipment(back).DeviceUID == algorithm.device_uid

    _assert_valid(path)
    rendering, _ = dsrdump(path)
    assert '(HV-XSIGN,99USFMD,"X sign view")' in rendering
    assert '"Probability")="0.7"' in rendering


def _inherited(error: str, header: Dataset) -> bool:
    """An error about one of the source's own UIDs, which a result must repeat as it is."""
    uids = (header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID)
    return any(f'"{uid}"' in error for uid in uids)


@needs_dciodvfy
@pytest.mark.parametrize("path", ultrasound_files(), ids=lambda p: p.name)
def test_every_corpus_file(tmp_path: Path, path: Path) -> None:
    """Every US file of pydicom and pydicom-data: ACR-NEMA dates, retired SOP Classes, 2 frames
    in a single-frame class, big endian, palettes, no patient birth date..."""
    header = pydicom.dcmread(path, stop_before_pixels=True)
    source = SourceImage.from_dataset(header)
    multi = source.is_multiframe
    finding = _vm(
        source, 0.7, best_frame=1 if multi else None, aggregation="max" if multi else None
    )
    algorithm = Algorithm("vm", "1", "usfmd", derive_uid("device", "vm", "1"))
    out = tmp_path / "sr.dcm"
    back = _write(_build([finding], algorithm), out)

    assert back.StudyInstanceUID == header.StudyInstanceUID
    [study] = back.CurrentRequestedProcedureEvidenceSequence
    [series] = study.ReferencedSeriesSequence
    [ref] = series.ReferencedSOPSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        header.SOPClassUID,
        header.SOPInstanceUID,
    )
    errors = [e for e in dciodvfy(out).errors if not _inherited(e, header)]
    assert errors == []


def test_legacy_dates_are_conformed(tmp_path: Path, algorithm: Algorithm) -> None:
    """ACR-NEMA dates/times become DICOM ones; what cannot be read is sent empty (unknown)."""
    header = _header(StudyDate="2024.10.24", StudyTime="09:03", PatientBirthDate="1996.13.01")
    source = SourceImage.from_dataset(header)
    back = _write(_build([_vm(source, 0.6)], algorithm), tmp_path / "sr.dcm")
    assert (back.StudyDate, back.StudyTime) == ("20241024", "0903")
    assert "PatientBirthDate" in back and back.PatientBirthDate == ""
    assert source.header.StudyDate == "2024.10.24", "the source's own header is left alone"


def test_rebuild_is_identical_and_versions_differ(
    still: Dataset, cine: Dataset, algorithm: Algorithm
) -> None:
    findings = [
        _vm(SourceImage.from_dataset(still), 0.93),
        _vm(SourceImage.from_dataset(cine), 0.2, best_frame=1, aggregation="max"),
    ]

    def encoded(sr: Dataset) -> bytes:
        buffer = io.BytesIO()
        sr.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    a, b = _build(findings, algorithm), _build(findings[::-1], algorithm)
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert encoded(a) == encoded(b)  # a re-sent result is the same object, byte for byte

    retrained = Algorithm(
        algorithm.name,
        "2025.04-1",
        algorithm.manufacturer,
        derive_uid("device", "ventriculomegaly", "2025.04-1"),
        synthetic=True,
    )
    c = _build(findings, retrained)
    assert c.SOPInstanceUID != a.SOPInstanceUID and c.SeriesInstanceUID != a.SeriesInstanceUID
    assert _our_equipment(c).DeviceUID != _our_equipment(a).DeviceUID
    # The same finding keeps its tracking UID from one model version to the next.
    tracked = [
        [g.tracking_uid for g in _content(sr).get_image_measurement_groups()] for sr in (a, c)
    ]
    assert tracked[0] == tracked[1]


@needs_dciodvfy
def test_superseding_sr_lists_its_predecessors(
    tmp_path: Path, still: Dataset, cine: Dataset, algorithm: Algorithm
) -> None:
    """A study re-opened by a late image gets a new SR that names the one it replaces."""
    first = _vm(SourceImage.from_dataset(still), 0.93)
    late = _vm(SourceImage.from_dataset(cine), 0.2, best_frame=1, aggregation="max")
    study = first.source.study_instance_uid
    earlier = _build([first], algorithm)
    later = _build(
        [first, late],
        algorithm,
        sop_instance_uid=derive_uid("sr", study, algorithm.device_uid, "2"),
        predecessors=[earlier],
    )
    path = tmp_path / "later.dcm"
    back = _write(later, path)
    (study_item,) = back.PredecessorDocumentsSequence
    assert study_item.StudyInstanceUID == study
    (series_item,) = study_item.ReferencedSeriesSequence
    assert series_item.SeriesInstanceUID == earlier.SeriesInstanceUID == back.SeriesInstanceUID
    (ref,) = series_item.ReferencedSOPSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        earlier.SOPClassUID,
        earlier.SOPInstanceUID,
    )
    assert "PredecessorDocumentsSequence" not in earlier
    _assert_valid(path)
    text, _ = dsrdump(path)
    assert re.search(r"Predecessor Docs\s*: 1\b", text), text[:600]

    with pytest.raises(ValueError, match="its own predecessor"):
        _build([first, late], algorithm, predecessors=[earlier])
    elsewhere = Dataset()
    elsewhere.update(
        {
            "SOPClassUID": earlier.SOPClassUID,
            "SOPInstanceUID": "1.2.3.4",
            "SeriesInstanceUID": "1.2.3",
            "StudyInstanceUID": "1.2.9",
        }
    )
    with pytest.raises(ValueError, match="another study"):
        _build([first], algorithm, predecessors=[elsewhere])
    del elsewhere.SeriesInstanceUID
    with pytest.raises(ValueError, match="lacks SeriesInstanceUID"):
        _build([first], algorithm, predecessors=[elsewhere])


def test_derive_uid_is_deterministic_and_valid() -> None:
    uid = derive_uid("sr", "1.2.3", "4.5.6")
    assert uid == derive_uid("sr", "1.2.3", "4.5.6")
    assert uid != derive_uid("sr", "1.2.3", "4.5.7")
    assert derive_uid("ab", "c") != derive_uid("a", "bc")
    assert uid.startswith("2.25.") and uid.is_valid and len(uid) <= 64
    # What pydicom offers instead is random with prefix=None: the reason derive_uid exists.
    assert generate_uid(prefix=None, entropy_srcs=["x"]) != generate_uid(
        prefix=None, entropy_srcs=["x"]
    )
    with pytest.raises(ValueError, match="at least one part"):
        derive_uid()
    with pytest.raises(ValueError, match="NUL"):
        derive_uid("a\x00b")


def test_no_patient_data_in_logs(
    caplog: pytest.LogCaptureFixture, still: Dataset, algorithm: Algorithm
) -> None:
    """highdicom warns with a Patient's Name it finds malformed (no '^'), as SonoSite's 'PLA'."""
    header = pydicom.dcmread(_real("examples_ybr_color.dcm"), stop_before_pixels=True)
    header.PatientName = "Dupont"  # no caret: what highdicom would complain about
    header.PatientID = "PID-4711"
    heart = Algorithm("hv", "1", "usfmd", derive_uid("d", "hv"))
    probs = {n: 0.2 for n in HEART.class_names}
    finding = ImageFinding(
        SourceImage.from_dataset(header),
        HEART,
        "aorta",
        0.2,
        probs,
        best_frame=3,
        aggregation="mean",
    )
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sr = _build([finding], heart)
        _build([_vm(SourceImage.from_dataset(still), 0.6)], algorithm)
    assert sr.PatientName == "Dupont"
    assert caplog.records, "build_sr logs what it built"
    # Warnings count too: a daemon that routes them to logging (captureWarnings) would log them.
    said = caplog.text + "\n".join(str(w.message) for w in caught)
    for secret in ("Dupont", "PID-4711", str(still.PatientName), str(still.PatientID)):
        assert secret not in said


# --- invalid inputs -------------------------------------------------------------------------


def _header(**changes: Any) -> Dataset:
    ds = phantom_dataset([make_phantom(3, "head")])
    with warnings.catch_warnings():  # pydicom warns about the invalid values we plant
        warnings.simplefilter("ignore")
        for key, value in changes.items():
            setattr(ds, key, value)
    return ds


@pytest.fixture(scope="module")
def source() -> SourceImage:
    return SourceImage.from_dataset(phantom_dataset([make_phantom(3, "head")]))


@pytest.fixture(scope="module")
def cine_source() -> SourceImage:
    return SourceImage.from_dataset(phantom_dataset(make_cine(3, 3, "head"), series_number=2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"synthetic": True}, "must contain 'synthetic'"),
        ({"name": "vm synthetic phantom"}, "says synthetic but synthetic=False"),
        ({"device_uid": "1.2.03"}, "device_uid '1.2.03' is not a valid DICOM UID"),
        ({"device_uid": ""}, "device_uid must be a non-empty UID"),
        ({"name": "x" * 65}, "longer than 64"),
        ({"version": "1\\2"}, "version .* printable ASCII without backslash"),
        ({"manufacturer": "Müller"}, "manufacturer .* printable ASCII"),
        ({"parameters": {"1bad": 1}}, "parameter name '1bad'"),
        ({"parameters": {"x": None}}, "parameter 'x' must be a str, int, float or bool"),
        ({"parameters": {"x": float("nan")}}, "parameter 'x' must be finite"),
    ],
)
def test_algorithm_rejects(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {
        "name": "vm model",
        "version": "1",
        "manufacturer": "usfmd",
        "device_uid": "1.2.3",
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Algorithm(**args)


@pytest.mark.parametrize(
    ("changes", "frame", "message"),
    [
        ({"Manufacturer": "usfmd"}, None, "written by usfmd"),
        ({}, 1, "single-frame .* use None"),
        ({"StudyInstanceUID": "1.2.x"}, None, "study_instance_uid '1.2.x' is not a UID"),
        ({"SeriesInstanceUID": "1." + "2" * 64}, None, "series_instance_uid .* is not a UID"),
    ],
)
def test_source_rejects(changes: dict[str, Any], frame: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SourceImage.from_dataset(_header(**changes), frame)


def test_source_must_agree_with_its_header() -> None:
    ds = _header()
    with pytest.raises(ValueError, match="'1.2.3.5' does not match the header's SOPInstanceUID"):
        SourceImage(ds.SOPClassUID, "1.2.3.5", ds.StudyInstanceUID, ds.SeriesInstanceUID, ds)
    # Leading zeros are tolerated in what scanners wrote, as long as header and fields agree.
    lax = _header(SOPInstanceUID="1.2.03.4")
    assert SourceImage.from_dataset(lax).sop_instance_uid == "1.2.03.4"


def test_source_rejects_non_images_and_bad_frames(cine_source: SourceImage) -> None:
    sr = _build(
        [_vm(SourceImage.from_dataset(_header()), 0.9)], Algorithm("m", "1", "usfmd", "1.2.3")
    )
    with pytest.raises(ValueError, match="no Rows/Columns"):
        SourceImage.from_dataset(sr)
    with pytest.raises(ValueError, match="frame_number 4 outside 1..3"):
        SourceImage.from_dataset(cine_source.header, 4)
    header = cine_source.header
    assert "PixelData" not in header  # the reference keeps no pixels


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_name": "hydrocephalus"}, "not a class of task 'ventriculomegaly'"),
        ({"probability": 1.5}, "probability must be a probability in \\[0, 1\\]"),
        ({"probability": float("nan")}, "probability must be a probability"),
        ({"probability": True}, "probability must be a number"),
        ({"probability": 0.8}, "differs from class_probabilities\\['ventriculomegaly'\\]"),
        ({"class_probabilities": {"ventriculomegaly": 0.9}}, "missing \\['normal'\\]"),
        (
            {"class_probabilities": {"normal": 0.1, "ventriculomegaly": 0.9, "x": 0.0}},
            "unexpected \\['x'\\]",
        ),
        ({"class_probabilities": {"normal": 0.3, "ventriculomegaly": 0.9}}, "must sum to 1"),
        ({"best_frame": 1}, "single-frame .* best_frame and aggregation must be None"),
        ({"aggregation": "mean"}, "single-frame"),
    ],
)
def test_finding_rejects(source: SourceImage, kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {
        "source": source,
        "task": VM,
        "class_name": "ventriculomegaly",
        "probability": 0.9,
        "class_probabilities": {"normal": 0.1, "ventriculomegaly": 0.9},
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ImageFinding(**args)


def test_cine_finding_rules(cine_source: SourceImage) -> None:
    probs = {"normal": 0.7, "ventriculomegaly": 0.6}  # max-aggregated: need not sum to 1
    ok = ImageFinding(cine_source, VM, "normal", 0.7, probs, best_frame=3, aggregation="max")
    assert ok.reported_frame == 3
    with pytest.raises(ValueError, match="needs the aggregation"):
        ImageFinding(cine_source, VM, "normal", 0.7, probs, best_frame=3)
    with pytest.raises(ValueError, match="best_frame 4 .* must be in 1..3"):
        ImageFinding(cine_source, VM, "normal", 0.7, probs, best_frame=4, aggregation="max")
    one = SourceImage.from_dataset(cine_source.header, 2)
    with pytest.raises(ValueError, match="has no aggregation"):
        ImageFinding(
            one, VM, "normal", 0.4, {"normal": 0.4, "ventriculomegaly": 0.6}, aggregation="max"
        )
    with pytest.raises(ValueError, match="differs from the analysed frame 2"):
        ImageFinding(one, VM, "normal", 0.4, {"normal": 0.4, "ventriculomegaly": 0.6}, best_frame=1)


def test_build_sr_rejects(
    still: Dataset, cine: Dataset, source: SourceImage, algorithm: Algorithm
) -> None:
    mine = _vm(SourceImage.from_dataset(still), 0.9)
    with pytest.raises(ValueError, match="at least one"):
        build_sr(
            [], algorithm, series_instance_uid="1.2.3", series_number=1, sop_instance_uid="1.2.4"
        )
    with pytest.raises(ValueError, match="span studies"):
        _build([mine, _vm(source, 0.9)], algorithm)
    probs = {n: 0.2 for n in HEART.class_names}
    other_task = ImageFinding(SourceImage.from_dataset(cine, 1), HEART, "aorta", 0.2, probs)
    with pytest.raises(ValueError, match="mix tasks"):
        _build([mine, other_task], algorithm)
    with pytest.raises(ValueError, match="two findings for SOP Instance"):
        _build([mine, mine], algorithm)
    with pytest.raises(ValueError, match="is the source's series"):
        _build([mine], algorithm, series_instance_uid=still.SeriesInstanceUID)
    with pytest.raises(ValueError, match="sop_instance_uid '1.02' is not a valid"):
        _build([mine], algorithm, sop_instance_uid="1.02")
    with pytest.raises(ValueError, match="series_number must be a positive int"):
        _build([mine], algorithm, series_number=0)
