"""The model part of an ``analyze`` job: route, infer, explain, and keep the results.

Compute happens outside any transaction (frames, forward passes, Eigen-CAM, heatmap files made
durable in the archive); the job's completion then commits, together: the findings, the
heatmaps' index rows and outbox entries, and — when this was the study's last analysis — one
``report`` job per model version, which writes the study's SR (:mod:`daemon.worker.report`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.db.models import Finding, Instance, JobState, ModelVersion
from daemon.db.queue import ClaimedJob
from daemon.db.sql import insert_ignore
from daemon.db.studies import queue_reports_if_settled
from daemon.dispatch.dispatcher import destination_names
from daemon.dispatch.results import ArchivedResult, record_result, write_result
from daemon.models.cache import LoadedModel, ModelCache
from daemon.worker.analyze import FrameSink, InstanceFile, StopCheck, analyze_instance
from daemon.worker.batching import task_run
from daemon.worker.handlers import Outcome, WorkContext
from daemon.worker.inference import TaskRun, heatmap, image_finding, source_image
from daemon.worker.routing import decide
from pipelines.clean import CleanFrame, CleanParams
from pipelines.infer import InstanceResult
from pipelines.inpaint import InpaintParams
from pipelines.tasks import list_tasks, register_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskOutcome:
    loaded: LoadedModel
    result: InstanceResult
    heatmap: ArchivedResult
    created: datetime


def model_cache(ctx: WorkContext) -> ModelCache:
    with ctx.shared.lock:  # the process's concurrent jobs share one cache
        if ctx.model_cache is None:
            for spec in ctx.settings.analysis.tasks:
                register_task(spec.to_spec())
            ctx.model_cache = ModelCache.from_settings(ctx.db, ctx.settings)
        cache: ModelCache = ctx.model_cache
        return cache


def _known_results(ctx: WorkContext, instance_pk: int, cache: ModelCache) -> dict[str, str]:
    """Findings this instance already has from the versions now active (a requeued job)."""
    with ctx.db.read() as session:
        rows = session.execute(
            select(Finding.task, Finding.class_name)
            .join(ModelVersion, ModelVersion.id == Finding.model_version_pk)
            .where(Finding.instance_pk == instance_pk, ModelVersion.active.is_(True))
        ).all()
    return {task: class_name for task, class_name in rows}


def clean_groups(
    models: Mapping[str, LoadedModel], params: CleanParams
) -> list[tuple[CleanParams, list[str]]]:
    """The passes over an instance's frames: one per distinct cleaning its tasks' models need.

    A model is fed frames inpainted as its training images were (the settings its file
    records), else with the daemon's ``[pipeline.inpaint]``; tasks whose models agree share a
    pass. The scrub is always the daemon's: removing burned-in PHI is not a model's choice.
    """
    groups: dict[InpaintParams, list[str]] = {}
    for task, loaded in models.items():
        groups.setdefault(loaded.inpaint or params.inpaint, []).append(task)
    return [(replace(params, inpaint=inpaint), tasks) for inpaint, tasks in groups.items()]


def _feeder(runs: list[TaskRun], stride: int) -> FrameSink:
    """Hands every ``stride``-th clean frame to each of ``runs``."""

    def feed(frame: CleanFrame) -> None:
        if frame.meta.frame_index % stride == 0:
            for run in runs:
                run.add(frame)

    return feed


def analyze_with_models(
    ctx: WorkContext,
    job: ClaimedJob,
    target: InstanceFile,
    path: Path,
    params: CleanParams,
    should_stop: StopCheck,
) -> Outcome:
    settings = ctx.settings.analysis
    cache = model_cache(ctx)
    header = dcmread(path, stop_before_pixels=True)
    all_tasks = [t.name for t in list_tasks()]
    results = _known_results(ctx, target.instance_pk, cache)
    outcomes: list[TaskOutcome] = []
    awaiting: list[str] = []
    while True:
        decision = decide(settings.routes, header, results, all_tasks)
        runs: dict[str, TaskRun] = {}
        for task in decision.run:
            loaded = cache.get(task)
            if loaded is None:
                awaiting.append(task)
                results[task] = ""  # decided: it waits for a model (and so do its dependants)
            else:
                runs[task] = task_run(ctx, loaded)
        if not runs:
            break
        models = {task: run.loaded for task, run in runs.items()}
        for clean, tasks in clean_groups(models, params):
            feed = _feeder([runs[t] for t in tasks], settings.frame_stride)
            analyze_instance(path, clean, sink=feed, should_stop=should_stop)
        for task, run in runs.items():
            outcome = _conclude(ctx, run, str(path), settings)
            outcomes.append(outcome)
            results[task] = outcome.result.class_name
    awaiting.extend(t for t in decision.deferred if t not in awaiting)
    now = datetime.now(UTC)
    payload: dict[str, Any] = {
        "findings": {
            o.loaded.task.name: {
                "class": o.result.class_name,
                "probability": round(o.result.probability, 4),
                "frames": o.result.frames,
                "model_version": o.loaded.ref.version,
            }
            for o in outcomes
        },
        "awaiting_model": sorted(set(awaiting)),
    }
    state = JobState.AWAITING_MODEL if awaiting else JobState.DONE
    log.info(
        "instance analysed",
        extra={"job": job.id, "findings": len(outcomes), "awaiting": len(set(awaiting))},
    )
    return Outcome(
        payload=payload,
        state=state,
        effect=_effect(ctx, job, target, outcomes, now),
    )


def _conclude(ctx: WorkContext, run: TaskRun, path: str, settings: Any) -> TaskOutcome:
    result = run.result(settings.aggregate, settings.top_k)
    source = source_image(path)
    finding = image_finding(run.loaded, source, result)
    created = datetime.now(UTC).replace(microsecond=0)
    archived = write_result(ctx.archive, heatmap(run, finding, result, created))
    return TaskOutcome(run.loaded, result, archived, created)


def _effect(
    ctx: WorkContext,
    job: ClaimedJob,
    target: InstanceFile,
    outcomes: list[TaskOutcome],
    now: datetime,
) -> Callable[[Session], None]:
    destinations = destination_names(ctx.settings)

    def apply(session: Session) -> None:
        study_pk = session.scalar(
            select(Instance.study_pk).where(Instance.id == target.instance_pk)
        )
        for o in outcomes:
            ref = o.loaded.ref
            stored = record_result(
                session,
                o.heatmap,
                destinations,
                now,
                key=f"sc:{ref.device_uid}:{o.heatmap.header.sop_instance_uid}",
            )
            insert_ignore(
                session.connection(),
                Finding,
                {
                    "instance_pk": target.instance_pk,
                    "study_pk": study_pk,
                    "model_version_pk": ref.id,
                    "task": o.loaded.task.name,
                    "class_name": o.result.class_name,
                    "probability": o.result.probability,
                    "probabilities": list(o.result.probabilities),
                    "frames": o.result.frames,
                    "best_frame": o.result.best_frame,
                    "aggregation": o.result.method if o.result.frames > 1 else None,
                    "heatmap_sop_instance_uid": stored.sop_instance_uid,
                    "created_at": o.created,
                },
            )
        if study_pk is not None:
            queue_reports_if_settled(session, int(study_pk), now, finishing=job.id)

    return apply
