"""The model registry: imported model versions (file by sha256, Device UID) and which is active.

A version is a usfmd model file copied into ``<data_dir>/models/`` plus one ``model_versions``
row. Every version gets a new Device UID, which every SR it produces carries as Contributing
Equipment (DESIGN.md §4). At most one version per task is active; workers use it.

Synthetic versions (trained on phantoms) are guarded twice: their Algorithm Name (TID 4019, shown
in every SR) must say "synthetic", and :func:`activate` refuses them unless the caller passes
``allow_synthetic=True`` (``usfmd models activate ID --allow-synthetic``). A forced activation is
recorded in the row's ``parameters["activation"]`` (``synthetic_forced``, time), so ``usfmd models
show`` says that a synthetic model was deliberately put in front of studies.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from daemon.db.models import Job, JobState, ModelVersion, utcnow
from daemon.db.studies import ANALYZE
from daemon.errors import UsfmdError
from daemon.receive.archive import fsync_path
from pipelines.errors import ModelLoadError

if TYPE_CHECKING:
    from pipelines.models.modelfile import ModelFileInfo

log = logging.getLogger(__name__)

#: A version label: goes into file names, so no path characters.
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
SYNTHETIC_WORD = "synthetic"
#: TID 4019 Algorithm Name (111001, DCM) is an LO value: at most 64 characters (PS3.5 §6.2).
ALGORITHM_NAME_MAX = 64


class ModelRegistryError(UsfmdError):
    """A model version cannot be imported, found, activated or loaded as asked."""


def models_dir(data_dir: Path) -> Path:
    """Where imported model files live: ``<data_dir>/models``."""
    return Path(data_dir) / "models"


def new_device_uid() -> str:
    """A UID of the UUID-derived form ``2.25.<uuid as integer>`` (PS3.5 §B.2), ≤ 44 characters."""
    return f"2.25.{uuid.uuid4().int}"


def _copy_hashed(source: Path, directory: Path) -> tuple[Path, str]:
    """Copy ``source`` to a temporary file in ``directory``, fsynced; return it and its sha256."""
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".import-", suffix=".tmp", dir=directory)
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb") as out:
            while block := src.read(1 << 20):
                digest.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp), digest.hexdigest()


def _algorithm_name(info: ModelFileInfo, given: str | None, synthetic: bool) -> str:
    """The given name, else the one the file's metadata carries (training names its model),
    else one made from task and encoder; checked either way."""
    recorded = info.metadata.get("algorithm_name")
    if given:
        name = given.strip()
    elif isinstance(recorded, str) and recorded.strip():
        name = recorded.strip()
    else:
        name = f"usfmd {info.task.name} {info.encoder}"
        if synthetic:
            name += f" ({SYNTHETIC_WORD} demo)"
    if not name or len(name) > ALGORITHM_NAME_MAX:
        raise ModelRegistryError(
            f"algorithm name {name!r} must have 1 to {ALGORITHM_NAME_MAX} characters (TID 4019, LO)"
        )
    if synthetic and SYNTHETIC_WORD not in name.lower():
        raise ModelRegistryError(
            f"algorithm name {name!r} must contain {SYNTHETIC_WORD!r}: the model was trained on "
            "synthetic data and every SR it produces has to say so"
        )
    return name


def import_model(
    session: Session,
    file: str | Path,
    *,
    version: str,
    synthetic: bool,
    metrics: dict[str, Any] | None = None,
    data_dir: Path,
    algorithm_name: str | None = None,
    now: datetime | None = None,
) -> ModelVersion:
    """Verify a usfmd model file, copy it into the registry and record a new version (inactive).

    The bytes are copied and hashed in one pass to a temporary file that is fsynced, loaded
    (which checks classes, encoder, preprocessing and every weight) and only then renamed into
    place (``os.replace``): what the row's sha256 describes is exactly what was verified.

    Parameters
    ----------
    version
        Label unique per task, e.g. ``2026.11-1``.
    synthetic
        Trained on synthetic phantoms. Must be True for a file that says so.
    metrics
        Evaluation results to show with the version; defaults to the file's ``metrics`` metadata.
    data_dir
        ``storage.data_dir``; the file goes to ``<data_dir>/models/``.
    algorithm_name
        TID 4019 Algorithm Name; must contain "synthetic" for synthetic versions. Default: the
        file's ``metadata["algorithm_name"]``, else "usfmd <task> <encoder>".

    Raises
    ------
    ModelRegistryError
        Bad version label, unusable file, synthetic mismatch, or task+version already present.
    """
    from pipelines.models.modelfile import load_model_file  # torch: only when importing

    now = now or utcnow()
    source = Path(file)
    if not _VERSION.match(version):
        raise ModelRegistryError(
            f"version {version!r} must be 1-64 letters, digits or '.', '_', '+', '-', "
            "starting with a letter or digit"
        )
    if not source.is_file():
        raise ModelRegistryError(f"model file {str(source)!r} does not exist")
    directory = models_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tmp, sha256 = _copy_hashed(source, directory)
    final: Path | None = None
    try:
        try:
            info = load_model_file(tmp).info
        except ModelLoadError as exc:
            raise ModelRegistryError(
                f"{source.name} is not a usable usfmd model file: {exc}"
            ) from exc
        if info.synthetic and not synthetic:
            raise ModelRegistryError(
                f"{source.name} was trained on synthetic data: import it as synthetic (--synthetic)"
            )
        name = _algorithm_name(info, algorithm_name, synthetic)
        task = info.task.name
        taken = session.scalar(
            select(ModelVersion.id).where(
                ModelVersion.task == task, ModelVersion.version == version
            )
        )
        if taken is not None:
            raise ModelRegistryError(
                f"task {task!r} already has a version {version!r} (id {taken})"
            )
        if metrics is None:
            found = info.metadata.get("metrics")
            metrics = found if isinstance(found, dict) else None
        final = directory / f"{task}-{version}-{sha256[:12]}.pt"
        tmp.chmod(0o444)  # imported files are never rewritten
        os.replace(tmp, final)
        fsync_path(directory)
        row = ModelVersion(
            task=task,
            version=version,
            algorithm_name=name,
            encoder=info.encoder,
            preprocessing=info.preprocessing.name,
            classes=list(info.classes),
            metrics=metrics,
            parameters={**info.parameters(), "source_file": source.name},
            path=final.name,
            sha256=sha256,
            device_uid=new_device_uid(),
            synthetic=synthetic,
            active=False,
            created_at=now,
        )
        session.add(row)
        session.flush()
        _unlink_on_rollback(session, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if final is not None:
            final.unlink(missing_ok=True)
        raise
    log.info(
        "model version imported",
        extra={"task": task, "version": version, "model_id": row.id, "sha256": sha256},
    )
    return row


def _unlink_on_rollback(session: Session, path: Path) -> None:
    """Remove the copied file if the caller's transaction rolls back (no row, no file)."""

    def rolled_back(_session: Session) -> None:
        path.unlink(missing_ok=True)

    def committed(_session: Session) -> None:
        if event.contains(session, "after_rollback", rolled_back):
            event.remove(session, "after_rollback", rolled_back)

    event.listen(session, "after_rollback", rolled_back, once=True)
    event.listen(session, "after_commit", committed, once=True)


def list_versions(session: Session, task: str | None = None) -> list[ModelVersion]:
    query = select(ModelVersion).order_by(ModelVersion.task, ModelVersion.id)
    if task is not None:
        query = query.where(ModelVersion.task == task)
    return list(session.scalars(query))


def get_version(session: Session, ref: int | str) -> ModelVersion:
    """A version by id (``12``) or ``task:version`` (``ventriculomegaly:2026.11-1``)."""
    text = str(ref)
    if text.isdigit():
        row = session.get(ModelVersion, int(text))
    elif ":" in text:
        task, _, version = text.partition(":")
        row = session.scalar(
            select(ModelVersion).where(ModelVersion.task == task, ModelVersion.version == version)
        )
    else:
        raise ModelRegistryError(f"model version {text!r}: give an id or task:version")
    if row is None:
        raise ModelRegistryError(f"no model version {text!r}")
    return row


def active_version(session: Session, task: str) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(ModelVersion.task == task, ModelVersion.active.is_(True))
    )


@dataclass(frozen=True, slots=True)
class Activation:
    version_id: int
    task: str
    previous: tuple[int, ...]
    requeued: int


def activate(
    session: Session,
    ref: int | str,
    *,
    allow_synthetic: bool = False,
    now: datetime | None = None,
) -> Activation:
    """Make a version the task's only active one and requeue analyses that waited for a model.

    Runs in the caller's transaction: deactivating the others, activating this one and moving
    ``analyze`` jobs from ``awaiting_model`` back to ``queued`` commit together. Analyze jobs
    carry no task, so every waiting one is requeued; a job whose tasks still lack a model
    returns to ``awaiting_model`` when a worker sees that.

    Raises
    ------
    ModelRegistryError
        Unknown version, or a synthetic one without ``allow_synthetic``.
    """
    now = now or utcnow()
    row = get_version(session, ref)
    if row.synthetic and not allow_synthetic:
        raise ModelRegistryError(
            f"model version {row.id} ({row.task}:{row.version}) was trained on synthetic data; "
            "activating it for real studies needs an explicit --allow-synthetic"
        )
    # Lock the task's rows (PostgreSQL; SQLite has one writer) so that two concurrent
    # activations serialise and exactly one version ends up active. In id order: without it
    # each transaction locks in heap order, which updates reshuffle, and two can deadlock.
    rows = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.task == row.task)
        .order_by(ModelVersion.id)
        .with_for_update()
    ).all()
    previous = tuple(r.id for r in rows if r.active and r.id != row.id)
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.task == row.task, ModelVersion.id != row.id)
        .values(active=False)
    )
    row.active = True
    row.activated_at = now
    parameters = dict(row.parameters or {})
    parameters["activation"] = {
        "at": now.isoformat(),
        "synthetic_forced": bool(row.synthetic and allow_synthetic),
    }
    row.parameters = parameters
    requeued = session.execute(
        update(Job)
        .where(Job.kind == ANALYZE, Job.state == JobState.AWAITING_MODEL)
        .values(state=JobState.QUEUED, not_before=now, updated_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    session.flush()
    if row.synthetic:
        log.warning(
            "synthetic model version activated by explicit request",
            extra={"task": row.task, "version": row.version, "model_id": row.id},
        )
    log.info(
        "model version activated",
        extra={
            "task": row.task,
            "model_id": row.id,
            "previous": list(previous),
            "requeued": int(requeued),
        },
    )
    return Activation(row.id, row.task, previous, int(requeued))


def deactivate(session: Session, ref: int | str, *, now: datetime | None = None) -> int:
    """Take a version out of service: its task has no active model until one is activated.

    Analyses that reach the task from now on wait ``awaiting_model``; findings and reports
    already made stay. Workers notice within ``models.reload_seconds``. Returns the version's
    id; deactivating an inactive version changes nothing.
    """
    now = now or utcnow()
    row = get_version(session, ref)
    if row.active:
        row.active = False
        parameters = dict(row.parameters or {})
        parameters["deactivation"] = {"at": now.isoformat()}
        row.parameters = parameters
        session.flush()
        log.info("model version deactivated", extra={"task": row.task, "model_id": row.id})
    return row.id


def describe(row: ModelVersion) -> dict[str, Any]:
    """A JSON-ready view of a version (``usfmd models show --json``)."""
    return {
        "id": row.id,
        "task": row.task,
        "version": row.version,
        "algorithm_name": row.algorithm_name,
        "encoder": row.encoder,
        "preprocessing": row.preprocessing,
        "classes": list(row.classes),
        "synthetic": row.synthetic,
        "active": row.active,
        "device_uid": row.device_uid,
        "sha256": row.sha256,
        "path": row.path,
        "created_at": row.created_at.isoformat(),
        "activated_at": row.activated_at.isoformat() if row.activated_at else None,
        "metrics": row.metrics,
        "parameters": row.parameters,
    }


__all__ = [
    "Activation",
    "ModelRegistryError",
    "activate",
    "active_version",
    "deactivate",
    "describe",
    "get_version",
    "import_model",
    "list_versions",
    "models_dir",
    "new_device_uid",
]
