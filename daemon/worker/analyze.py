"""The ``analyze`` job: one archived instance through decode → scrub → inpaint, then the models.

A thin shell: it finds the instance's file, asks the model registry whether any task has an
active version, and runs :func:`analyze_instance` — decode and clean, one frame at a time
(:func:`pipelines.clean.clean_instance`), each clean frame handed to a sink. Inference (issue 4)
plugs in as that sink, after the clean stage. Until a model version is active nothing can be
concluded about the images, so the job ends ``awaiting_model`` with the stage report as its
payload — never a made-up result — and ``usfmd jobs retry`` (or activating a model) puts it back
in line.

Between frames the job checks whether its lease was lost (another worker owns it now: stop) or
the worker is stopping (give the job back to the queue, uncounted, and stop).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
from sqlalchemy import select

from daemon.config import PipelineSettings
from daemon.db import queue
from daemon.db.engine import Database
from daemon.db.models import Instance, JobState, ModelVersion
from daemon.db.queue import ClaimedJob
from daemon.worker.handlers import JobFailed, JobReleased, Outcome, WorkContext
from pipelines.clean import (
    CleanFrame,
    CleanParams,
    InstanceSummary,
    NoStripConfigured,
    TooMuchToInpaint,
    clean_instance,
)
from pipelines.errors import DecodeError
from pipelines.inpaint import InpaintParams
from pipelines.scrub import ScrubParams

log = logging.getLogger(__name__)

#: Receives each clean frame, in order (inference will be one).
FrameSink = Callable[[CleanFrame], None]
#: Returns why to stop (``"lease lost"``, ``"worker stopping"``) or ``None`` to go on.
StopCheck = Callable[[], str | None]

AWAITING_REASON = "no active model version for any task"


class Interrupted(JobFailed):
    """The job stopped between frames: its lease was lost or its worker is stopping."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"analysis interrupted between frames: {reason}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class InstanceFile:
    """What the job needs to know about its instance (no patient data)."""

    instance_pk: int
    #: Relative to the archive root: ``<study>/<series>/<sop>.dcm`` (UIDs only).
    path: str
    number_of_frames: int


def clean_params(settings: PipelineSettings) -> CleanParams:
    """The clean stage's parameters from the ``[pipeline]`` configuration section."""
    strips = {(band.manufacturer, band.model or "*"): band.rows for band in settings.scrub_bands}
    return CleanParams(
        scrub=ScrubParams(strips=strips),
        inpaint=InpaintParams(**settings.inpaint.model_dump()),
        detect_band=settings.detect_band,
        max_inpainted_fraction=settings.max_inpainted_fraction,
    )


def analyze_instance(
    path: str | Path,
    params: CleanParams,
    *,
    sink: FrameSink | None = None,
    should_stop: StopCheck | None = None,
) -> InstanceSummary:
    """Decode and clean every frame of one DICOM file, streaming; return the stage report.

    Parameters
    ----------
    path
        The instance's file.
    params
        The clean stage's settings.
    sink
        Called with each clean frame, in order, before the next is decoded.
    should_stop
        Asked before every frame; a reason stops the analysis with :class:`Interrupted`.

    Raises
    ------
    Interrupted
        ``should_stop`` gave a reason.
    pipelines.errors.DecodeError, pipelines.clean.NoStripConfigured
        The instance cannot be decoded or cleaned.
    pipelines.clean.TooMuchToInpaint
        A frame is mostly colour or marks (``pipeline.max_inpainted_fraction``).
    """
    summary = InstanceSummary()
    frames = clean_instance(path, params)
    try:
        while True:
            reason = should_stop() if should_stop is not None else None
            if reason:
                raise Interrupted(reason)
            frame = next(frames, None)
            if frame is None:
                return summary
            if sink is not None:
                sink(frame)
            summary.add(frame)
    finally:
        frames.close()


def active_tasks(db: Database) -> list[str]:
    """Tasks with an active model version in the registry, sorted."""
    with db.read() as session:
        rows = session.scalars(
            select(ModelVersion.task).where(ModelVersion.active.is_(True)).distinct()
        )
        return sorted(rows)


def instance_file(db: Database, job: ClaimedJob) -> InstanceFile:
    if job.instance_pk is None:
        raise JobFailed(f"analyze job {job.id} names no instance")
    with db.read() as session:
        row = session.get(Instance, job.instance_pk)
        if row is None:
            raise JobFailed(f"instance {job.instance_pk} of analyze job {job.id} is not indexed")
        return InstanceFile(row.id, row.path, row.number_of_frames)


def _stop_check(ctx: WorkContext) -> StopCheck:
    def check() -> str | None:
        if ctx.lease_lost.is_set():
            return "lease lost (another worker owns the job now)"
        if ctx.stopping.is_set():
            return "worker stopping"
        return None

    return check


def run_analyze(ctx: WorkContext, job: ClaimedJob) -> Outcome:
    """Handler of ``analyze`` jobs (registered in :data:`daemon.worker.handlers.HANDLERS`).

    Routes the instance to its tasks; tasks with an active model version run in one pass over
    the clean frames and each yields a finding and a heatmap; routed tasks without one leave
    the job ``awaiting_model`` (their findings come when a version is activated and the job is
    requeued; findings already made are kept and not redone).
    """
    # Workers are processes, one per core (queue.workers): OpenCV's own thread pool would only
    # make them compete for the same cores.
    cv2.setNumThreads(1)
    target = instance_file(ctx.db, job)
    path = ctx.archive.absolute(target.path)
    params = clean_params(ctx.settings.pipeline)
    with _job_errors(ctx, job, target):
        if not active_tasks(ctx.db):
            summary = analyze_instance(path, params, should_stop=_stop_check(ctx))
            _log_cleaned(job, summary)
            return Outcome(
                payload={"stages": summary.as_dict(), "awaiting": AWAITING_REASON},
                state=JobState.AWAITING_MODEL,
            )
        from daemon.worker.analysis import analyze_with_models

        return analyze_with_models(ctx, job, target, path, params, _stop_check(ctx))


@contextmanager
def _job_errors(ctx: WorkContext, job: ClaimedJob, target: InstanceFile) -> Iterator[None]:
    """What the stages raise, as the job's outcome: interrupted (released when the worker
    stops), permanently failed (the archived bytes cannot be decoded or cleaned), or failed for
    now (the archived file is missing)."""
    try:
        yield
    except Interrupted as exc:
        if ctx.stopping.is_set() and not ctx.lease_lost.is_set():
            queue.release(ctx.db, job, ctx.worker, datetime.now(UTC))
            raise JobReleased(exc.reason) from exc
        raise
    except (DecodeError, NoStripConfigured, TooMuchToInpaint) as exc:
        # The messages name the SOP Instance UID and the rule, never patient data.
        raise JobFailed(f"{type(exc).__name__}: {exc}", permanent=True) from exc
    except FileNotFoundError as exc:
        raise JobFailed(f"archived file missing: {target.path}") from exc


def _log_cleaned(job: ClaimedJob, summary: InstanceSummary) -> None:
    log.info(
        "instance cleaned",
        extra={
            "job": job.id,
            "frames": summary.frames,
            "ms_per_frame": summary.as_dict()["ms_per_frame"]["total"],
        },
    )
