"""The ``report`` job: one TID 1500 SR per study and model version, from the stored findings.

Queued when a study's last analysis settles (see
:func:`daemon.worker.analysis.queue_reports_if_settled`). The SR's UIDs and time stamps derive
from the findings it covers, so running the job again rebuilds the identical object (and the
outbox sends it once); a study re-opened by a late instance gets a new SR that covers the new
findings too and names the SRs it supersedes in its Predecessor Documents Sequence.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.db.models import Finding, Instance, ModelVersion, OutputInstance
from daemon.db.queue import ClaimedJob
from daemon.dispatch.dispatcher import destination_names
from daemon.dispatch.results import record_result, write_result
from daemon.worker.handlers import JobFailed, Outcome, WorkContext
from daemon.worker.inference import MANUFACTURER, SR_SERIES_NUMBER
from pipelines.report import Algorithm, ImageFinding, SourceImage, build_sr, derive_uid
from pipelines.tasks import get_task


def run_report(ctx: WorkContext, job: ClaimedJob) -> Outcome:
    study_pk = int(job.params.get("study_pk", 0))
    version_pk = int(job.params.get("model_version_pk", 0))
    with ctx.db.read() as session:
        version = session.get(ModelVersion, version_pk)
        rows = session.execute(
            select(Finding, Instance.path, Instance.number_of_frames)
            .join(Instance, Instance.id == Finding.instance_pk)
            .where(Finding.study_pk == study_pk, Finding.model_version_pk == version_pk)
            .order_by(Finding.id)
        ).all()
        if version is None or not rows:
            raise JobFailed(
                f"report job {job.id}: no findings of model version {version_pk} in study "
                f"{study_pk}",
                permanent=True,
            )
        session.expunge_all()
    task = get_task(version.task)
    findings: list[ImageFinding] = []
    for finding, path, frames in rows:
        header = dcmread(ctx.archive.absolute(path), stop_before_pixels=True)
        findings.append(
            ImageFinding(
                source=SourceImage.from_dataset(header),
                task=task,
                class_name=finding.class_name,
                probability=finding.probability,
                class_probabilities=dict(zip(task.class_names, finding.probabilities, strict=True)),
                best_frame=finding.best_frame + 1 if frames > 1 else None,
                aggregation=finding.aggregation,
            )
        )
    study_uid = findings[0].source.study_instance_uid
    covered = ",".join(str(f.id) for f, _, _ in rows)
    fingerprint = hashlib.sha256(covered.encode()).hexdigest()[:16]
    created = max(f.created_at for f, _, _ in rows).astimezone(UTC)
    algorithm = Algorithm(
        name=version.algorithm_name,
        version=version.version,
        manufacturer=MANUFACTURER,
        device_uid=version.device_uid,
        parameters={"encoder": version.encoder, "preprocessing": version.preprocessing},
        synthetic=version.synthetic,
    )
    key = f"sr:{study_uid}:{version.device_uid}:{fingerprint}"
    sr = build_sr(
        findings,
        algorithm,
        series_instance_uid=derive_uid("sr-series", study_uid, version.device_uid),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derive_uid("sr", study_uid, version.device_uid, fingerprint),
        created=created,
        predecessors=_predecessors(ctx, study_uid, version.device_uid, key),
    )
    archived = write_result(ctx.archive, sr)
    destinations = destination_names(ctx.settings)
    now = datetime.now(UTC)

    def effect(session: Session) -> None:
        record_result(
            session,
            archived,
            destinations,
            now,
            key=key,
        )

    return Outcome(
        payload={
            "sr": archived.header.sop_instance_uid,
            "findings": len(findings),
            "model_version": version.version,
        },
        effect=effect,
    )


def _predecessors(ctx: WorkContext, study_uid: str, device_uid: str, key: str) -> list[Dataset]:
    """Headers of the SRs this model version wrote for this study before the one keyed ``key``.

    "Before" is the order in which they were recorded, so a re-run of an earlier report job
    rebuilds its SR with the same predecessors as the first time (and so the same bytes).
    """
    prefix = f"sr:{study_uid}:{device_uid}:"
    with ctx.db.read() as session:
        mine = session.scalar(select(OutputInstance.id).where(OutputInstance.result_key == key))
        query = (
            select(Instance.path)
            .join(OutputInstance, OutputInstance.instance_pk == Instance.id)
            .where(OutputInstance.result_key.startswith(prefix, autoescape=True))
            .order_by(OutputInstance.id)
        )
        if mine is not None:
            query = query.where(OutputInstance.id < mine)
        paths = list(session.scalars(query))
    return [dcmread(ctx.archive.absolute(p), stop_before_pixels=True) for p in paths]
