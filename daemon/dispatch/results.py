"""Keep a result usfmd produced (SR, heatmap SC): durable in the archive, indexed, queued.

A result is written once and then only ever sent as those bytes: a re-dispatch or a retry
sends the archived file, so the same result never gets a second SOP Instance UID. Storing is
idempotent by SOP Instance UID and, when the producer names the result with a ``key``, by that
key too (a job that runs again finds the object it made the first time).

Two halves, so a worker can write the file outside any transaction and commit the index rows
together with its job's completion (:class:`daemon.worker.handlers.Outcome.effect`):
:func:`write_result` (file I/O) and :func:`record_result` (rows, in the caller's session).
:func:`store_result` does both.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.db.engine import Database
from daemon.db.index import RESULT_SOP_CLASSES, InstanceHeader, produced_by_us, record_instance
from daemon.db.models import Instance, OutputInstance
from daemon.db.sql import insert_ignore
from daemon.dispatch import outbox
from daemon.errors import ConformanceError
from daemon.receive.archive import Archive, atomic_write_bytes
from daemon.receive.sop_classes import OWN_MANUFACTURER

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ArchivedResult:
    """A result file made durable in the archive (not yet indexed)."""

    header: InstanceHeader
    #: Relative to the archive root.
    path: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class StoredResult:
    sop_instance_uid: str
    sop_class_uid: str
    instance_pk: int
    path: str
    #: False when the same object (or an object with the same key) was stored before.
    created: bool
    #: Destinations this call queued it for (empty when it was queued before).
    queued: tuple[str, ...]


def encode(ds: Dataset) -> tuple[bytes, InstanceHeader]:
    """The DICOM file (PS3.10) for ``ds``, file meta completed, and its index header.

    Refuses (:class:`ConformanceError`) objects that are not results usfmd may send: a storage
    class the dispatcher does not know, no usfmd Manufacturer (the loop guard would not
    recognise it coming back), or a missing or invalid Type 1 UID.
    """
    if not produced_by_us(ds):
        raise ConformanceError(
            f"result has Manufacturer {str(ds.get('Manufacturer'))!r}; every object usfmd "
            f"writes must carry {OWN_MANUFACTURER!r} (General Equipment, PS3.3 C.7.5.1) "
            "so the loop guard recognises it"
        )
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in RESULT_SOP_CLASSES:
        raise ConformanceError(
            f"result SOP Class {sop_class!r} is not one usfmd writes results in "
            "(SR, KOS, PDF, Secondary Capture)"
        )
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    ds.file_meta = meta
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    header = InstanceHeader.from_dataset(ds, str(meta.TransferSyntaxUID))
    # PS3.10 §7.1: the file meta names the same SOP Class and Instance as the dataset.
    meta.MediaStorageSOPClassUID = header.sop_class_uid
    meta.MediaStorageSOPInstanceUID = header.sop_instance_uid
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue(), header


def write_result(archive: Archive, ds: Dataset) -> ArchivedResult:
    """Make ``ds`` durable in the archive (temporary file, fsync, rename, directory fsync).

    A file already archived under its SOP Instance UID is kept as it is: what may have been
    sent already is never replaced by different bytes.
    """
    data, header = encode(ds)
    relative = archive.relative_path(
        header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
    )
    target = archive.absolute(relative)
    if not target.is_file():
        archive.check_space()
        atomic_write_bytes(target, data)
    return ArchivedResult(header, relative, target.stat().st_size)


def find_result(
    session: Session, sop_instance_uid: str | None = None, key: str | None = None
) -> OutputInstance | None:
    """The recorded result with this key, else with this SOP Instance UID."""
    if key is not None:
        found = session.scalar(select(OutputInstance).where(OutputInstance.result_key == key))
        if found is not None:
            return found
    if sop_instance_uid is None:
        return None
    return session.scalar(
        select(OutputInstance).where(OutputInstance.sop_instance_uid == sop_instance_uid)
    )


def _queue_existing(
    session: Session, output: OutputInstance, destinations: Sequence[str], now: datetime
) -> StoredResult:
    path = session.scalar(select(Instance.path).where(Instance.id == output.instance_pk))
    queued = outbox.enqueue(session, output.instance_pk, output.sop_instance_uid, destinations, now)
    return StoredResult(
        output.sop_instance_uid, output.sop_class_uid, output.instance_pk, str(path), False,
        tuple(queued),
    )  # fmt: skip


def record_result(
    session: Session,
    archived: ArchivedResult,
    destinations: Sequence[str],
    now: datetime,
    key: str | None = None,
) -> StoredResult:
    """Index an archived result (never analysable), mark it ours, queue it for ``destinations``.

    Runs in the caller's transaction. When a result with the same SOP Instance UID or ``key``
    is recorded already, that one is (idempotently) queued instead and nothing is indexed.
    """
    h = archived.header
    existing = find_result(session, h.sop_instance_uid, key)
    if existing is not None:
        return _queue_existing(session, existing, destinations, now)
    # produced_by_us (checked by encode) keeps it unanalysable and its study closed.
    record_instance(
        session, h, path=archived.path, size_bytes=archived.size_bytes, calling_ae=None, now=now
    )
    conn = session.connection()
    instance_pk = conn.scalar(
        select(Instance.id).where(Instance.sop_instance_uid == h.sop_instance_uid)
    )
    if instance_pk is None:  # pragma: no cover - record_instance inserted or found it
        raise ConformanceError(f"result {h.sop_instance_uid} was not indexed")
    values = {
        "sop_instance_uid": h.sop_instance_uid,
        "sop_class_uid": h.sop_class_uid,
        "instance_pk": instance_pk,
        "result_key": key,
        "created_at": now,
    }
    if not insert_ignore(conn, OutputInstance, values):
        # A concurrent producer recorded it (or its key) first: use theirs.
        winner = find_result(session, h.sop_instance_uid, key)
        if winner is None:  # pragma: no cover - a conflict means a row exists
            raise ConformanceError(f"result {h.sop_instance_uid} conflicts with no row")
        return _queue_existing(session, winner, destinations, now)
    queued = outbox.enqueue(session, instance_pk, h.sop_instance_uid, destinations, now)
    return StoredResult(
        h.sop_instance_uid, h.sop_class_uid, instance_pk, archived.path, True, tuple(queued)
    )


def store_result(
    db: Database,
    archive: Archive,
    ds: Dataset,
    destinations: Sequence[str],
    now: datetime,
    key: str | None = None,
) -> StoredResult:
    """Archive, index and queue one result; idempotent (see the module docstring).

    Parameters
    ----------
    destinations
        Names from ``dispatch.destinations`` (usually every one: ``Settings.dispatch``).
    key
        Names the result independently of its UIDs, e.g. ``"sr/<study UID>/<model version>"``.
    """
    uid = str(ds.get("SOPInstanceUID", ""))
    with db.read() as session:
        known = find_result(session, uid, key) is not None
    # A known result is only (re)queued: no file is written, so no second UID can appear.
    archived = None if known else write_result(archive, ds)
    with db.write() as session:
        existing = find_result(session, uid, key)
        if existing is not None:
            result = _queue_existing(session, existing, destinations, now)
        elif archived is not None:
            result = record_result(session, archived, destinations, now, key)
        else:  # pragma: no cover - output rows are never deleted
            raise ConformanceError(f"result {uid} disappeared while being stored")
    if result.created:
        log.info(
            "result archived",
            extra={"sop_instance_uid": result.sop_instance_uid, "queued": list(result.queued)},
        )
    return result
