"""The TID 1500 Measurement Report: one Comprehensive 3D SR per study and model version.

Encoding (DESIGN.md §4, IHE AI Results): root TID 1500 with a device observer (the model
version); per analysed image one TID 1501 measurement group holding a tracking identifier, the
finding as a qualitative evaluation (concept = the task's finding, value = the reported class's
code), one NUM (122157, DCM, "Probability") per class — the reported class first — each with a
concept modifier naming its class, TID 4019 algorithm identification, and the source image. A cine
analysed as a whole also names its best frame ((121080, DCM, "Best illustration of finding")).
The document is UNVERIFIED, joins the source study in a new series, lists every source image in
the Current Requested Procedure Evidence Sequence (0040,A375) and carries the model version's
Device UID in Contributing Equipment.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipelines.report.common import (
    algorithm_equipment,
    check_new_object_uids,
    coded,
    coding_scheme_items,
    resolve_created,
    stamp_created,
    study_header,
    without_patient_name,
)
from pipelines.report.inputs import USFMD_MANUFACTURER, Algorithm, ImageFinding
from pipelines.report.uids import derive_uid
from pipelines.tasks import Code

logger = logging.getLogger(__name__)

#: (122157, DCM, "Probability").
PROBABILITY = hd.sr.CodedConcept.from_code(codes.DCM.Probability)
#: A probability is a dimensionless fraction in [0, 1]: UCUM ``{ratio}`` (PS3.16 CID 7181).
PROBABILITY_UNIT = hd.sr.CodedConcept.from_code(codes.UCUM.Ratio)
#: TID 1500 "Procedure reported" (CID 100 is extensible): SNOMED CT obstetric ultrasound scan.
OBSTETRIC_US = Code("268445003", "SCT", "Ultrasound scan - obstetric")
BEST_ILLUSTRATION = hd.sr.CodedConcept.from_code(codes.DCM.BestIllustrationOfFinding)


def tracking_uid(finding: ImageFinding) -> str:
    """Tracking Unique Identifier of a finding: the same task on the same image (and frame)
    keeps its UID across model versions, so a PACS can follow it from report to report."""
    frame = finding.source.frame_number
    return derive_uid(
        "tracking", finding.task.name, finding.source.sop_instance_uid, str(frame or 0)
    )


def _sort_key(finding: ImageFinding) -> tuple[int, int, str, int]:
    header = finding.source.header

    def number(keyword: str) -> int:
        try:
            return int(header.get(keyword) or 0)
        except (TypeError, ValueError):
            return 0

    return (
        number("SeriesNumber"),
        number("InstanceNumber"),
        finding.source.sop_instance_uid,
        finding.source.frame_number or 0,
    )


def _probability(finding: ImageFinding, class_name: str) -> hd.sr.Measurement:
    """NUM Probability of one class, with a HAS CONCEPT MOD naming that class (TID 300 row 2)."""
    task = finding.task
    measurement = hd.sr.Measurement(
        name=PROBABILITY,
        value=finding.class_probabilities[class_name],
        unit=PROBABILITY_UNIT,
    )
    modifier = hd.sr.CodeContentItem(
        name=coded(task.finding),
        value=coded(task.classes[task.index(class_name)].code),
        relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
    )
    item = measurement[0]
    if "ContentSequence" in item:
        item.ContentSequence.append(modifier)
    else:
        item.ContentSequence = hd.sr.ContentSequence([modifier])
    return measurement


def _group(
    finding: ImageFinding, index: int, algorithm: Algorithm
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    source = finding.source
    task = finding.task
    extra: dict[str, str | int] = {"task": task.name}
    if finding.aggregation is not None:
        extra.update(aggregation=finding.aggregation, frames=source.number_of_frames)
    others = [n for n in task.class_names if n != finding.class_name]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(finding), identifier=f"{task.name} image {index}"
        ),
        finding_type=coded(task.finding),
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=algorithm.name,
            version=algorithm.version,
            parameters=algorithm.parameter_strings(**extra),
            manufacturer=algorithm.manufacturer,
        ),
        measurements=[_probability(finding, n) for n in (finding.class_name, *others)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=coded(task.finding), value=coded(finding.code))
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=source.sop_class_uid,
                referenced_sop_instance_uid=source.sop_instance_uid,
                referenced_frame_numbers=source.frame_reference(source.frame_number),
            )
        ],
    )
    if finding.aggregation is not None and finding.best_frame is not None:
        # TID 1501 is extensible: the frame a whole-cine finding is best seen on, which is the
        # frame of its heatmap.
        group[0].ContentSequence.append(
            hd.sr.ImageContentItem(
                name=BEST_ILLUSTRATION,
                referenced_sop_class_uid=source.sop_class_uid,
                referenced_sop_instance_uid=source.sop_instance_uid,
                referenced_frame_numbers=source.frame_reference(finding.best_frame),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    return group


def _check_findings(findings: Sequence[ImageFinding]) -> None:
    if not findings:
        raise ValueError("findings must hold at least one ImageFinding")
    for finding in findings:
        if not isinstance(finding, ImageFinding):
            raise ValueError(f"findings must be ImageFinding, got {type(finding).__name__}")
    first = findings[0]
    seen: set[tuple[str, int | None]] = set()
    for finding in findings:
        if finding.source.study_instance_uid != first.source.study_instance_uid:
            raise ValueError(
                f"findings span studies {first.source.study_instance_uid} and "
                f"{finding.source.study_instance_uid}: one SR per study"
            )
        if finding.task != first.task:
            raise ValueError(
                f"findings mix tasks {first.task.name!r} and {finding.task.name!r}: one SR per "
                "model version, which serves one task"
            )
        key = (finding.source.sop_instance_uid, finding.source.frame_number)
        if key in seen:
            raise ValueError(
                f"two findings for SOP Instance {key[0]} frame {key[1]}: one measurement group "
                "per analysed image"
            )
        seen.add(key)


def build_sr(
    findings: Sequence[ImageFinding],
    algorithm: Algorithm,
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int = 1,
    created: datetime.datetime | None = None,
    procedure_reported: Code = OBSTETRIC_US,
    predecessors: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """One Comprehensive 3D SR holding every finding of one model version on one study.

    Parameters
    ----------
    findings
        One per analysed image (or analysed frame), all of the same study and task.
    algorithm
        The model version; its Device UID goes into the observer context and Contributing
        Equipment.
    series_instance_uid, series_number, sop_instance_uid, instance_number
        Chosen by the caller (see :func:`pipelines.report.derive_uid`), so that re-building the
        same result gives the same SOP Instance UID. The series must be new.
    created
        Content, series and instance creation time; pass a stored one to rebuild identically.
    procedure_reported
        TID 1500 Procedure Reported (default: obstetric ultrasound scan).
    predecessors
        Earlier SRs of the same study and model version whose findings this one repeats (a
        study re-opened by a late instance): listed in the Predecessor Documents Sequence, so a
        PACS or reader knows this report supersedes them. Each needs its SOP Class, SOP
        Instance, Series and Study Instance UIDs.

    Raises
    ------
    ValueError
        When the findings span studies or tasks, repeat an image, a UID is unusable, or a
        predecessor belongs to another study or is this SR itself.
    """
    _check_findings(findings)
    if not isinstance(algorithm, Algorithm):
        raise ValueError(f"algorithm must be an Algorithm, got {type(algorithm).__name__}")
    ordered = sorted(findings, key=_sort_key)
    headers = [study_header(f.source.header) for f in ordered]
    check_new_object_uids(
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        sources=headers,
    )
    when = resolve_created(created)
    task = ordered[0].task
    _check_predecessors(predecessors, headers[0].StudyInstanceUID, sop_instance_uid)

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid,
            name=algorithm.name,
            manufacturer_name=algorithm.manufacturer,
            model_name=algorithm.name,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=coded(procedure_reported),
        imaging_measurements=[_group(f, i, algorithm) for i, f in enumerate(ordered, start=1)],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[without_patient_name(h) for h in headers],
        content=report[0],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=USFMD_MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[algorithm_equipment(algorithm, when)],
        previous_versions=list(predecessors) or None,
        series_description=f"usfmd AI results: {task.name}"[:64],
        content_date=when.date(),
        content_time=when.time(),
    )
    sr.copy_patient_and_study_information(headers[0])
    # highdicom lists evidence with the class it was shown; a retired source class was shown as
    # its successor (common.RETIRED_AS_CURRENT), so put the instance's real class back.
    real_class = {f.source.sop_instance_uid: f.source.sop_class_uid for f in ordered}
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.ReferencedSeriesSequence:
            for reference in series.ReferencedSOPSequence:
                reference.ReferencedSOPClassUID = real_class[reference.ReferencedSOPInstanceUID]
    sr.CodingSchemeIdentificationSequence = coding_scheme_items()
    stamp_created(sr, when)
    logger.info(
        "built TID 1500 SR",
        extra={
            "sop_instance_uid": sop_instance_uid,
            "task": task.name,
            "findings": len(ordered),
            "device_uid": algorithm.device_uid,
            "predecessors": len(predecessors),
        },
    )
    return sr


def _check_predecessors(
    predecessors: Sequence[Dataset], study_instance_uid: str, sop_instance_uid: str
) -> None:
    for pre in predecessors:
        missing = [
            k
            for k in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
            if not pre.get(k)
        ]
        if missing:
            raise ValueError(f"predecessor SR lacks {', '.join(missing)}")
        if pre.StudyInstanceUID != study_instance_uid:
            raise ValueError(
                f"predecessor SR {pre.SOPInstanceUID} belongs to another study than the findings"
            )
        if pre.SOPInstanceUID == sop_instance_uid:
            raise ValueError(f"SR {sop_instance_uid} cannot be its own predecessor")
