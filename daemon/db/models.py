"""The index schema: patient → study → series → instance, the job queue, commitment requests.

The archive files are the truth for pixel data; these rows make them findable and drive the work.
The schema changes only through Alembic revisions in ``migrations/versions``; a test compares these
models with the migrated database so the two cannot drift.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names so that migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = String(64)  # PS3.5 §9.1: a UID is at most 64 characters
AE = String(16)  # PS3.5 §6.2, VR AE


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite would hand back naive datetimes)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: usfmd stores UTC-aware times only")
        if value is not None and dialect.name == "sqlite":
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"  # instances arrived within the stability window
    STABLE = "stable"  # idle for stable_seconds: jobs were queued


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # will be retried after back-off
    DEAD = "dead"  # gave up after max attempts: needs an operator
    CANCELLED = "cancelled"
    AWAITING_MODEL = "awaiting_model"


class CommitmentState(enum.StrEnum):
    PENDING = "pending"
    REPORTED = "reported"
    UNDELIVERABLE = "undeliverable"


def _enum(cls: type[enum.StrEnum]) -> Enum:
    # Stored as plain strings (no native ENUM type): portable and readable with any SQL client.
    return Enum(cls, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patients_identity"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # PHI lives here and in the archive only; nothing in it is ever logged.
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer: Mapped[str] = mapped_column(String(64), default="")
    name: Mapped[str | None] = mapped_column(String(324))
    birth_date: Mapped[str | None] = mapped_column(String(8))
    sex: Mapped[str | None] = mapped_column(String(16))
    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id"))
    study_date: Mapped[str | None] = mapped_column(String(8))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[StudyState] = mapped_column(_enum(StudyState), default=StudyState.RECEIVING)
    calling_ae: Mapped[str | None] = mapped_column(AE)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    stable_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")

    __table_args__ = (Index("ix_studies_state_last", "state", "last_received_at"),)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    model_name: Mapped[str | None] = mapped_column(String(64))
    study: Mapped[Study] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    photometric_interpretation: Mapped[str | None] = mapped_column(String(16))
    #: Relative to the archive root.
    path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str | None] = mapped_column(AE)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: Whether the pipeline may analyse it (image SOP class, not an SR/KOS/PDF, not our output).
    analysable: Mapped[bool] = mapped_column(Boolean)
    #: How many times the same SOP Instance UID was sent again (kept, not duplicated).
    duplicates: Mapped[int] = mapped_column(Integer, default=0)


class Job(Base):
    """One unit of queued work; its row is the whole story: state, attempts, last error."""

    __tablename__ = "jobs"
    __table_args__ = (
        # One job of a kind per instance: re-sends and re-opened studies never duplicate work.
        UniqueConstraint("kind", "instance_pk", name="uq_jobs_kind_instance"),
        Index("ix_jobs_state_not_before", "state", "not_before"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    #: Names a job that must exist once (e.g. ``report:<study>:<model version>:<findings>``);
    #: enqueueing the same key again is a no-op.
    dedup_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    #: The instance an ``analyze`` job works on; None for jobs about no instance (``probe``).
    instance_pk: Mapped[int | None] = mapped_column(ForeignKey("instances.id"))
    study_pk: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    #: Kind-specific arguments (small JSON object).
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    not_before: Mapped[datetime] = mapped_column(UTCDateTime())
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class JobResult(Base):
    """The effect of a finished job, committed in the same transaction as its completion.

    One row per job (unique ``job_pk``) and the completion is conditional on the worker still
    holding the lease, so a job has exactly one effect even when workers race.
    """

    __tablename__ = "job_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    worker: Mapped[str] = mapped_column(String(128))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class CommitmentRequest(Base):
    """A Storage Commitment N-ACTION we answered, and whether its report reached the requester."""

    __tablename__ = "commitment_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(UID, index=True)
    calling_ae: Mapped[str] = mapped_column(AE)
    state: Mapped[CommitmentState] = mapped_column(
        _enum(CommitmentState), default=CommitmentState.PENDING
    )
    committed: Mapped[int] = mapped_column(Integer)
    failed: Mapped[int] = mapped_column(Integer)
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime())
    reported_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)


class ModelVersion(Base):
    """One imported model: weights file (by sha256) plus everything needed to use and cite it.

    ``device_uid`` identifies this version as Contributing Equipment in every SR it produces
    (DESIGN.md §4): a new version always gets a new UID. At most one version per task is
    ``active``; workers use the active one and notice a change without restarting.
    """

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("task", "version", name="uq_model_versions_task_version"),
        Index("ix_model_versions_task_active", "task", "active"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    #: Algorithm Name in TID 4019; says "synthetic" for models trained on phantoms.
    algorithm_name: Mapped[str] = mapped_column(String(64))
    encoder: Mapped[str] = mapped_column(String(64))
    preprocessing: Mapped[str] = mapped_column(String(32))
    #: Class names in model-output order (must equal the task's at import time).
    classes: Mapped[list[str]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: Free-form build details (head, LoRA settings, training data summary).
    parameters: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: Weights file, relative to the data directory's ``models`` folder.
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    device_uid: Mapped[str] = mapped_column(UID, unique=True)
    #: Trained on synthetic phantoms: never chosen by default for real studies.
    synthetic: Mapped[bool] = mapped_column(Boolean, default=False)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class OutboxState(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"  # claimed by an association (leased)
    SENT = "sent"  # the destination answered Success or an accepted warning
    FAILED = "failed"  # will be retried after back-off
    DEAD = "dead"  # gave up after dispatch.max_attempts: needs an operator
    CANCELLED = "cancelled"  # by an operator


class OutputInstance(Base):
    """A DICOM object usfmd produced (SR, heatmap SC): what the loop guard knows as ours.

    ``result_key`` names the result (e.g. study + model version) so a job that runs twice finds
    the object it already made instead of minting a second SOP Instance UID for it.
    """

    __tablename__ = "output_instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.id"), unique=True)
    result_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class OutboxItem(Base):
    """One object for one destination; like a job, its row is the whole story of its sending."""

    __tablename__ = "outbox"
    __table_args__ = (
        # Enqueueing twice never sends twice: one row per object and destination.
        UniqueConstraint("sop_instance_uid", "destination", name="uq_outbox_sop_destination"),
        Index("ix_outbox_destination_state_not_before", "destination", "state", "not_before"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    #: ``dispatch.destinations[].name``.
    destination: Mapped[str] = mapped_column(String(64))
    #: The archived file that is sent, byte for byte.
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    state: Mapped[OutboxState] = mapped_column(_enum(OutboxState), default=OutboxState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: Earliest next attempt (back-off after a failure).
    not_before: Mapped[datetime] = mapped_column(UTCDateTime())
    #: The association slot that holds it while sending; a lease that expires frees it.
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: DIMSE Status of the destination's last C-STORE response (None: no response).
    last_status: Mapped[int | None] = mapped_column(Integer)
    #: Why the last attempt failed: statuses and network errors only, never patient data.
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Finding(Base):
    """What one model version concluded about one image: the row behind its SR content.

    One per (instance, model version): re-running an analysis finds the row instead of adding
    one. ``created_at`` is reused when the SR or heatmap is rebuilt, so rebuilt objects are
    byte-identical (pipelines/report).
    """

    __tablename__ = "findings"
    __table_args__ = (
        UniqueConstraint("instance_pk", "model_version_pk", name="uq_findings_instance_version"),
        Index("ix_findings_study_version", "study_pk", "model_version_pk"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    model_version_pk: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    task: Mapped[str] = mapped_column(String(64))
    class_name: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    #: Every class's aggregated probability, in the task's class order.
    probabilities: Mapped[list[float]] = mapped_column(JSON)
    frames: Mapped[int] = mapped_column(Integer)
    #: 0-based frame the heatmap shows (the best frame of a cine).
    best_frame: Mapped[int] = mapped_column(Integer)
    aggregation: Mapped[str | None] = mapped_column(String(16))
    heatmap_sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
