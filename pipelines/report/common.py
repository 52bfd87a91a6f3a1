"""What the SR and the heatmap share: equipment, coding schemes, study header, time stamps."""

from __future__ import annotations

import copy
import datetime
import re

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UltrasoundImageStorage, UltrasoundMultiFrameImageStorage
from pydicom.valuerep import DA, DT, TM

from pipelines.report.inputs import Algorithm, check_uid
from pipelines.tasks import USFMD_SCHEME, USFMD_SCHEME_NAME, USFMD_SCHEME_VERSION, Code

#: IHE AI Results (AIR): Purpose of Reference of the algorithm's Contributing Equipment item.
PROCESSING_ALGORITHM = hd.sr.CodedConcept("Newcode1", "99IHE", "Processing Algorithm")

#: Patient and study attributes of Type 2 in the Patient and General Study modules (PS3.3 C.7.1.1,
#: C.7.2.1): present, possibly empty, in every object we write, whatever the source left out.
_TYPE2_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


#: Retired SOP Classes old scanners still send (retired in PS3.6 Table A-1), mapped to the
#: current class with the same Patient and Study modules: highdicom copies those modules by the
#: source's IOD and knows current classes only (pydicom-data's color-pl.dcm is one such file).
RETIRED_AS_CURRENT = {
    "1.2.840.10008.5.1.4.1.1.6": UltrasoundImageStorage,
    "1.2.840.10008.5.1.4.1.1.3": UltrasoundMultiFrameImageStorage,
}
_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_LEGACY_DA = re.compile(r"^(\d{4})\.(\d{2})\.(\d{2})$")
_LEGACY_TM = re.compile(r"^(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?$")


def coded(code: Code | hd.sr.CodedConcept) -> hd.sr.CodedConcept:
    """A task registry :class:`~pipelines.tasks.Code` as highdicom's coded concept."""
    if isinstance(code, hd.sr.CodedConcept):
        return code
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def _conform(vr: str, value: str) -> str | None:
    """A DA or TM value in DICOM form, or ``None`` when it cannot be read as one.

    Old scanners write ACR-NEMA's ``yyyy.mm.dd`` and ``hh:mm:ss``, which PS3.5 Table 6.2-1 (DA,
    TM notes) no longer allows; we write the same date and time in DICOM form.
    """
    text = value.strip()
    if vr == "DA":
        legacy = _LEGACY_DA.match(text)
        text = "".join(legacy.groups()) if legacy else text
        return text if _DA.match(text) and DA(text) is not None else None
    legacy = _LEGACY_TM.match(text)
    text = "".join(g or "" for g in legacy.groups()) if legacy else text
    return text if _TM.match(text) and TM(text) is not None else None


def study_header(header: Dataset) -> Dataset:
    """A copy of the source header fit for highdicom to copy into our objects.

    Every Type 2 patient/study attribute is present; top-level dates and times are in DICOM form
    (a value that cannot be read is sent empty, i.e. unknown, rather than copied non-conformant);
    a retired SOP Class reads as its current successor (see :data:`RETIRED_AS_CURRENT`). Only
    what highdicom copies comes from here: references always use the source's real class.
    """
    out = copy.deepcopy(header)
    if out.SOPClassUID in RETIRED_AS_CURRENT:
        out.SOPClassUID = RETIRED_AS_CURRENT[out.SOPClassUID]
    for keyword in _TYPE2_STUDY:
        if keyword not in out:
            setattr(out, keyword, None)
    for element in out:
        if element.VR in ("DA", "TM") and element.VM == 1 and element.value:
            try:
                element.value = _conform(element.VR, str(element.value))
            except ValueError:  # a well-formed string that is no date, e.g. month 13
                element.value = None
    return out


def without_patient_name(header: Dataset) -> Dataset:
    """``header`` with an empty Patient's Name, for highdicom constructors.

    highdicom's base constructor warns (``UserWarning``, which services often route to their
    logs) about a Patient's Name it considers malformed (no ``^``), quoting the name. We copy
    the real name afterwards with ``copy_patient_and_study_information``, which says nothing.
    """
    out = copy.deepcopy(header)  # a shallow copy would share (and blank) the original's elements
    out.PatientName = None
    return out


def algorithm_equipment(
    algorithm: Algorithm, created: datetime.datetime
) -> hd.ContributingEquipment:
    """The model version as a Contributing Equipment item (PS3.3 C.12.1, IHE AIR).

    highdicom restricts Purpose of Reference to DICOM's CID 7005 codes, so the item is built with
    (109102, DCM, "Processing Equipment") and then given the IHE AIR code the profile requires.
    Device UID (0018,1002) is the model version's, so each version is a distinct device.
    """
    item = hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        contribution_datetime=created,
        contribution_description="AI model inference (unverified)",
    )
    item.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    item.DeviceUID = algorithm.device_uid
    return item


def coding_scheme_items() -> list[Dataset]:
    """Coding Scheme Identification Sequence (0008,0110) items for the local schemes we use.

    PS3.3 §8.2 reserves the ``99`` prefix for local schemes, and the SOP Common Module (Table
    C.12-1) maps such designators to what they mean: our own ``99USFMD`` and IHE's ``99IHE``
    (the Processing Algorithm purpose code).
    """
    return [
        hd.coding_schemes.CodingSchemeIdentificationItem(
            designator=USFMD_SCHEME,
            name=USFMD_SCHEME_NAME,
            version=USFMD_SCHEME_VERSION,
            responsible_organization="usfmd",
        ),
        hd.coding_schemes.CodingSchemeIdentificationItem(
            designator="99IHE",
            name="IHE local codes",
            responsible_organization="IHE",
        ),
    ]


def stamp_created(dataset: Dataset, created: datetime.datetime) -> None:
    """Give every creation time stamp the caller's time, so a rebuild is byte-identical."""
    dataset.InstanceCreationDate = DA(created.date())
    dataset.InstanceCreationTime = TM(created.time())
    dataset.SeriesDate = DA(created.date())
    dataset.SeriesTime = TM(created.time())
    if "ContentDate" in dataset:
        dataset.ContentDate = DA(created.date())
        dataset.ContentTime = TM(created.time())
    # highdicom stamps its own Contributing Equipment item with the wall clock.
    for item in dataset.get("ContributingEquipmentSequence", []):
        if item.get("ManufacturerModelName") == "highdicom":
            item.ContributionDateTime = DT(created)


def check_new_object_uids(
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int,
    sources: list[Dataset],
) -> None:
    """Our object lies in a new series and has its own SOP Instance UID (DESIGN.md §4)."""
    check_uid("series_instance_uid", series_instance_uid)
    check_uid("sop_instance_uid", sop_instance_uid)
    for name, number in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"{name} must be a positive int (IS), got {number!r}")
    for header in sources:
        if str(header.SeriesInstanceUID) == series_instance_uid:
            raise ValueError(
                f"series_instance_uid {series_instance_uid} is the source's series: results go "
                "into a new series"
            )
        if str(header.SOPInstanceUID) == sop_instance_uid:
            raise ValueError(f"sop_instance_uid {sop_instance_uid} is a source image's UID")


def resolve_created(created: datetime.datetime | None) -> datetime.datetime:
    """The caller's creation time (pass it to make rebuilds identical), else now, to the second."""
    if created is None:
        created = datetime.datetime.now()
    if not isinstance(created, datetime.datetime):
        raise ValueError(f"created must be a datetime, got {type(created).__name__}")
    if created.tzinfo is not None:  # DICOM dates and times are local (PS3.5 6.2 DA/TM)
        created = created.astimezone().replace(tzinfo=None)
    return created.replace(microsecond=0)
