"""Index a received instance: patient, study, series and instance rows in one transaction.

:class:`InstanceHeader` is a pure description read from a dataset; :func:`record_instance` writes
it. Re-sent SOP Instance UIDs are idempotent: the first file and row stay, a counter goes up.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from pydicom.dataset import Dataset
from sqlalchemy import Connection, Executable, Table, bindparam, exists, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert

from daemon.db.models import Instance, OutputInstance, Patient, Series, Study, StudyState
from daemon.db.sql import insert_ignore
from daemon.errors import ConformanceError
from daemon.receive.archive import is_valid_uid
from daemon.receive.sop_classes import OWN_MANUFACTURER, STORED_ONLY_SOP_CLASSES, is_analysable

#: The SOP classes usfmd writes results in (PS3.4 B.5): reports and documents, and the Secondary
#: Capture family for heatmaps; never an ultrasound class. Only these can carry a SOP Instance
#: UID recorded as ours, so the loop guard's lookup skips the bulk of ingest (ultrasound).
RESULT_SOP_CLASSES: frozenset[str] = frozenset(STORED_ONLY_SOP_CLASSES) | {
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
}


#: A pydicom Dataset, or the plain fields daemon.receive.header decoded the same way.
HeaderSource = Dataset | Mapping[str, Any]


def _text(ds: HeaderSource, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)[:limit]


def _int(ds: HeaderSource, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """What the index needs from a dataset's header (no pixel data)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str
    issuer: str
    patient_name: str | None
    birth_date: str | None
    sex: str | None
    study_date: str | None
    accession_number: str | None
    modality: str | None
    series_number: int | None
    manufacturer: str | None
    model_name: str | None
    instance_number: int | None
    number_of_frames: int
    rows: int | None
    columns: int | None
    photometric_interpretation: str | None
    #: Made by usfmd (or derived from what it made): stored, never analysed (loop guard).
    produced_by_us: bool = False

    @property
    def analysable(self) -> bool:
        return not self.produced_by_us and is_analysable(self.sop_class_uid, self.manufacturer)

    @classmethod
    def from_dataset(cls, ds: HeaderSource, transfer_syntax_uid: str) -> InstanceHeader:
        """Read the header, raising :class:`ConformanceError` when a Type 1 UID is unusable.

        PS3.3 C.12.1 (SOP Common), C.7.2.1 (General Study), C.7.3.1 (General Series): the SOP
        Class/Instance, Study and Series Instance UIDs are Type 1 and must be valid UIDs.
        """
        uids: dict[str, str] = {}
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            value = str(ds.get(keyword, "") or "").strip().rstrip("\x00")
            if not value:
                raise ConformanceError(f"Type 1 attribute {keyword} is missing or empty")
            if not is_valid_uid(value):
                raise ConformanceError(f"{keyword} {value!r} is not a valid UID (PS3.5 §9.1)")
            uids[keyword] = value
        frames = _int(ds, "NumberOfFrames") or 1
        return cls(
            sop_class_uid=uids["SOPClassUID"],
            sop_instance_uid=uids["SOPInstanceUID"],
            study_instance_uid=uids["StudyInstanceUID"],
            series_instance_uid=uids["SeriesInstanceUID"],
            transfer_syntax_uid=transfer_syntax_uid,
            patient_id=_text(ds, "PatientID", 64) or "",
            issuer=_text(ds, "IssuerOfPatientID", 64) or "",
            patient_name=_text(ds, "PatientName", 324),
            birth_date=_text(ds, "PatientBirthDate", 8),
            sex=_text(ds, "PatientSex", 16),
            study_date=_text(ds, "StudyDate", 8),
            accession_number=_text(ds, "AccessionNumber", 16),
            modality=_text(ds, "Modality", 16),
            series_number=_int(ds, "SeriesNumber"),
            manufacturer=_text(ds, "Manufacturer", 64),
            model_name=_text(ds, "ManufacturerModelName", 64),
            instance_number=_int(ds, "InstanceNumber"),
            number_of_frames=max(frames, 1),
            rows=_int(ds, "Rows"),
            columns=_int(ds, "Columns"),
            photometric_interpretation=_text(ds, "PhotometricInterpretation", 16),
            produced_by_us=produced_by_us(ds),
        )


def _is_ours(manufacturer: object) -> bool:
    return str(manufacturer or "").strip().casefold() == OWN_MANUFACTURER


def produced_by_us(ds: HeaderSource) -> bool:
    """Whether ``ds`` is one of usfmd's results, or was derived from one (loop guard, DESIGN §4).

    usfmd writes its name as Manufacturer (0008,0070) of the General Equipment module (PS3.3
    C.7.5.1) of every object it makes, and lists itself in the Contributing Equipment Sequence
    (0018,A001, SOP Common, PS3.3 C.12.1) of results; an object that a PACS or workstation
    derives from ours keeps that item. Either one means: store, never analyse. The comparison
    ignores case and padding, which a PACS may change; ``usfmd-phantom`` (test scanners) is
    a different name and stays analysable.
    """
    if _is_ours(ds.get("Manufacturer")):
        return True
    contributing = ds.get("ContributingEquipmentSequence") or []
    return any(_is_ours(item.get("Manufacturer")) for item in contributing)


# The statements of the ingest path are built once, with bind parameters, on the tables (not the
# ORM entities): SQLAlchemy then finds each one's compiled form by a cache key memoized on the
# statement object, instead of building a statement, its cache key and its ORM plumbing anew for
# every C-STORE (that was ~3/4 of the index's CPU time per instance).
_PATIENTS = cast(Table, Patient.__table__)
_STUDIES = cast(Table, Study.__table__)
_SERIES = cast(Table, Series.__table__)
_INSTANCES = cast(Table, Instance.__table__)

_FIND_PATIENT = select(_PATIENTS.c.id).where(
    _PATIENTS.c.patient_id == bindparam("b_patient_id"),
    _PATIENTS.c.issuer == bindparam("b_issuer"),
)
_FIND_STUDY = select(_STUDIES.c.id).where(_STUDIES.c.study_instance_uid == bindparam("b_study"))
# A new instance (re)opens the study: the stability clock restarts (mercure-style idle timeout).
# One UPDATE ... RETURNING finds and touches an existing study in one statement.
_TOUCH_STUDY = (
    update(_STUDIES)
    .where(_STUDIES.c.study_instance_uid == bindparam("b_study"))
    .values(
        last_received_at=bindparam("b_now"),
        state=StudyState.RECEIVING,
        calling_ae=bindparam("b_calling_ae"),
    )
    .returning(_STUDIES.c.id)
)
_FIND_SERIES = select(_SERIES.c.id).where(_SERIES.c.series_instance_uid == bindparam("b_series"))
_INDEXED_PATH = select(_INSTANCES.c.path).where(
    _INSTANCES.c.sop_instance_uid == bindparam("b_sop_instance")
)


@functools.cache
def _insert_ignore(dialect: str, table: Table) -> Insert:
    """INSERT ... ON CONFLICT DO NOTHING RETURNING id, for executing with a row of values."""
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing().returning(table.c.id)
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing().returning(table.c.id)
    raise NotImplementedError(dialect)  # pragma: no cover - only the two supported backends


def _insert_row(conn: Connection, table: Table, values: dict[str, Any]) -> bool:
    """Insert ``values`` unless a concurrent writer holds the same unique key; True if inserted.

    As :func:`daemon.db.sql.insert_ignore`, with a prebuilt statement (RETURNING, not rowcount).
    """
    stmt = _insert_ignore(conn.dialect.name, table)
    return conn.execute(stmt, values).first() is not None


def _patient_pk(conn: Connection, h: InstanceHeader) -> int:
    identity = {"b_patient_id": h.patient_id, "b_issuer": h.issuer}
    pk = conn.scalar(_FIND_PATIENT, identity)
    if pk is None:
        _insert_row(
            conn,
            _PATIENTS,
            {
                "patient_id": h.patient_id,
                "issuer": h.issuer,
                "name": h.patient_name,
                "birth_date": h.birth_date,
                "sex": h.sex,
            },
        )
        pk = conn.scalar(_FIND_PATIENT, identity)
    return int(pk)  # type: ignore[arg-type]


def _study_pk(conn: Connection, h: InstanceHeader, calling_ae: str | None, now: datetime) -> int:
    find: Executable
    params: dict[str, Any]
    if h.produced_by_us:
        # Loop guard: our own result (stored by us, or coming back from a PACS) joins its
        # study without re-opening it, so it can never make the study due for work again.
        find, params = _FIND_STUDY, {"b_study": h.study_instance_uid}
    else:
        find = _TOUCH_STUDY
        params = {"b_study": h.study_instance_uid, "b_now": now, "b_calling_ae": calling_ae}
    pk = conn.scalar(find, params)
    if pk is None:
        _insert_row(
            conn,
            _STUDIES,
            {
                "study_instance_uid": h.study_instance_uid,
                "patient_pk": _patient_pk(conn, h),
                "study_date": h.study_date,
                "accession_number": h.accession_number,
                "state": StudyState.RECEIVING.value,
                "calling_ae": calling_ae,
                "first_received_at": now,
                "last_received_at": now,
            },
        )
        pk = conn.scalar(find, params)  # ours, or a concurrent association's
    return int(pk)  # type: ignore[arg-type]


def _series_pk(conn: Connection, h: InstanceHeader, study_pk: int) -> int:
    params = {"b_series": h.series_instance_uid}
    pk = conn.scalar(_FIND_SERIES, params)
    if pk is None:
        _insert_row(
            conn,
            _SERIES,
            {
                "series_instance_uid": h.series_instance_uid,
                "study_pk": study_pk,
                "modality": h.modality,
                "series_number": h.series_number,
                "manufacturer": h.manufacturer,
                "model_name": h.model_name,
            },
        )
        pk = conn.scalar(_FIND_SERIES, params)
    return int(pk)  # type: ignore[arg-type]


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    return session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))


def indexed_path(conn: Connection, sop_instance_uid: str) -> str | None:
    """The archive path recorded for ``sop_instance_uid``, or None if it is not indexed."""
    return conn.scalar(_INDEXED_PATH, {"b_sop_instance": sop_instance_uid})


def count_duplicate(session: Session, sop_instance_uid: str) -> None:
    session.execute(
        update(Instance)
        .where(Instance.sop_instance_uid == sop_instance_uid)
        .values(duplicates=Instance.duplicates + 1)
    )


def record_instance(
    session: Session,
    header: InstanceHeader,
    *,
    path: str,
    size_bytes: int,
    calling_ae: str | None,
    now: datetime,
) -> bool:
    """Insert the rows for a newly archived instance; return False if it was already indexed.

    Three statements for an instance of a known series (touch study, find series, insert),
    prebuilt Core statements run on the session's connection, in the session's transaction:
    nothing here loads objects (see docs/benchmarks.md, Ingest).
    """
    conn = session.connection()
    # Loop guard by identity: a SOP Instance UID we recorded as our result is never analysed,
    # even if a PACS coerced its Manufacturer on the way back. The subquery runs inside the
    # INSERT (no extra round trip), and only for a class we write results in that would be
    # analysable otherwise (a Secondary Capture): ultrasound ingest pays nothing for it.
    analysable: Any = header.analysable
    guarded = bool(analysable) and header.sop_class_uid in RESULT_SOP_CLASSES
    if guarded:
        analysable = ~exists().where(OutputInstance.sop_instance_uid == header.sop_instance_uid)
    study_pk = _study_pk(conn, header, calling_ae, now)
    series_pk = _series_pk(conn, header, study_pk)
    values = {
        "sop_instance_uid": header.sop_instance_uid,
        "sop_class_uid": header.sop_class_uid,
        "series_pk": series_pk,
        "study_pk": study_pk,
        "transfer_syntax_uid": header.transfer_syntax_uid,
        "instance_number": header.instance_number,
        "number_of_frames": header.number_of_frames,
        "rows": header.rows,
        "columns": header.columns,
        "photometric_interpretation": header.photometric_interpretation,
        "path": path,
        "size_bytes": size_bytes,
        "calling_ae": calling_ae,
        "received_at": now,
        "analysable": analysable,
        "duplicates": 0,
    }
    # The loop guard's subquery is part of the statement, so that row takes the generic path.
    inserted = (
        insert_ignore(conn, Instance, values) if guarded else _insert_row(conn, _INSTANCES, values)
    )
    if inserted:
        return True
    count_duplicate(session, header.sop_instance_uid)  # a concurrent association won the race
    return False
