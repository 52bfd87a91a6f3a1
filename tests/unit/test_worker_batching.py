"""Jobs side by side in one worker process: their frames share forward passes (one batcher per
model version), results equal predicting each instance alone, each job keeps its own lease, and
a newly activated version's jobs get a new batcher while the old one serves its last jobs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import func, select, update

from daemon.config import Settings, load_settings
from daemon.db import migrate, queue
from daemon.db.engine import Database
from daemon.db.models import Finding, Instance, Job, JobResult, JobState
from daemon.db.studies import ANALYZE
from daemon.models import ModelCache, activate, import_model, models_dir
from daemon.models.cache import LoadedModel
from daemon.receive.archive import Archive
from daemon.service import open_archive, open_database
from daemon.worker.analysis import model_cache
from daemon.worker.analyze import analyze_instance, clean_params
from daemon.worker.batching import BatcherPool, batcher_pool, task_run
from daemon.worker.handlers import HANDLERS, PROBE, Outcome, WorkContext
from daemon.worker.inference import TaskRun, predictor_for
from daemon.worker.loop import Worker
from pipelines.clean import Cleaner, CleanFrame
from pipelines.infer import Predictor, aggregate
from pipelines.models import build_task_model, get_encoder_card, save_model_file
from pipelines.phantom import frame_meta, make_cine, make_phantom
from pipelines.phantom.dicom import phantom_dataset
from pipelines.preprocess import preprocess

from helpers import archive_stable

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
TINY = dict(get_encoder_card("usf-mae-vit-b16").tiny_overrides)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(7)
    model = build_task_model("heart_view", "usf-mae-vit-b16", overrides=TINY)
    path = tmp_path_factory.mktemp("batching") / "heart.pt"
    save_model_file(path, model, synthetic=True)
    return path


def _settings(tmp_path: Path, db_url: str, **analysis: object) -> Settings:
    return load_settings(
        None,
        storage={"data_dir": str(tmp_path / "data"), "min_free_space": 0},
        database={"url": db_url},
        queue={"workers": 0, "jobs_per_worker": 4},
        models={"device": "cpu"},
        analysis={"routes": [{"task": "heart_view"}], **analysis},
    )


def _activate(db: Database, data_dir: Path, file: Path, version: str) -> int:
    with db.write() as session:
        row = import_model(session, file, version=version, synthetic=True, data_dir=data_dir)
        session.flush()
        activate(session, row.id, allow_synthetic=True)
        return row.id


@pytest.fixture
def loaded(tmp_path: Path, model_file: Path) -> Iterator[LoadedModel]:
    db = Database(f"sqlite:///{tmp_path / 'models.db'}")
    migrate.upgrade(db.engine)
    _activate(db, tmp_path, model_file, "1")
    found = ModelCache(db, models_dir(tmp_path), device="cpu").get("heart_view")
    assert found is not None
    yield found
    db.dispose()


def _clean(seed: int, frames: int = 1) -> list[CleanFrame]:
    samples = make_cine(seed, frames, "heart") if frames > 1 else [make_phantom(seed, "heart")]
    cleaner = Cleaner()
    return [
        cleaner(
            s.annotated,
            frame_meta(s, sop_instance_uid=f"2.25.{seed}", frame_index=i, number_of_frames=frames),
        )
        for i, s in enumerate(samples)
    ]


def _direct(loaded: LoadedModel, frames: list[CleanFrame]) -> np.ndarray:
    inputs = np.stack([preprocess(f.pixels, loaded.preprocessing) for f in frames])
    return predictor_for(loaded).predict(inputs)


def test_concurrent_jobs_frames_share_one_forward_pass(loaded: LoadedModel) -> None:
    """Six one-frame instances analysed at once: one batch of six, each result as if alone."""
    instances = [_clean(100 + i) for i in range(6)]
    pool = BatcherPool(max_batch=6, max_wait_ms=5000)
    start = threading.Barrier(len(instances))
    results: dict[int, np.ndarray] = {}

    def job(index: int) -> None:
        batcher = pool.hold(loaded, predictor_for(loaded))
        try:
            run = TaskRun(loaded, batcher)
            start.wait()
            for frame in instances[index]:
                run.add(frame)
            results[index] = np.array(run.result("mean", 5).probabilities)
        finally:
            pool.release(batcher)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(len(instances))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    stats = pool.batchers()["heart_view"].stats
    pool.close()
    assert (stats.batches, stats.frames, stats.largest) == (1, 6, 6)
    for index, frames in enumerate(instances):
        np.testing.assert_allclose(results[index], _direct(loaded, frames)[0], atol=1e-5)


def test_a_cine_through_the_batcher_equals_direct_prediction(loaded: LoadedModel) -> None:
    """Frames in flight are bounded; the table, aggregate and best frames are unchanged."""
    frames = _clean(200, frames=5)
    with_pool = BatcherPool(max_batch=2, max_wait_ms=1)
    batcher = with_pool.hold(loaded, predictor_for(loaded))
    run = TaskRun(loaded, batcher, in_flight=3)
    for frame in frames:
        run.add(frame)
        assert len(run._waiting) < 3
    result = run.result("max", 5)
    table = _direct(loaded, frames)
    expected = aggregate(table, loaded.task.class_names, method="max", k=5)
    assert result.class_name == expected.class_name and result.frames == 5
    np.testing.assert_allclose(result.probabilities, expected.probabilities, atol=1e-5)
    best = int(np.argmax(table[:, result.class_index]))
    assert run.best(result.class_index).frame_index == best
    assert np.array_equal(run.best(result.class_index).pixels, frames[best].pixels)
    assert batcher.stats.largest == 2 and batcher.stats.frames == 5
    with_pool.release(batcher)
    with_pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        with_pool.hold(loaded, predictor_for(loaded))


def test_a_new_version_gets_a_new_batcher_and_the_old_one_serves_its_holders(
    loaded: LoadedModel,
) -> None:
    import dataclasses

    pool = BatcherPool(max_batch=4, max_wait_ms=1)
    old = pool.hold(loaded, predictor_for(loaded))
    assert pool.hold(loaded, predictor_for(loaded)) is old  # same version: shared
    newer = dataclasses.replace(loaded, ref=dataclasses.replace(loaded.ref, id=loaded.ref.id + 1))
    new = pool.hold(newer, predictor_for(newer))
    assert new is not old and pool.batchers() == {"heart_view": new}
    frame = preprocess(_clean(300)[0].pixels, loaded.preprocessing)[None]
    assert old(frame, timeout=30)["probabilities"].shape == (1, 5)  # retired, still serving
    pool.release(old)
    assert old(frame, timeout=30)["probabilities"].shape == (1, 5)
    pool.release(old)  # the last holder: closed
    with pytest.raises(RuntimeError, match="closed"):
        old.submit(frame)
    with pytest.raises(ValueError, match="not held"):
        pool.release(old)
    pool.release(new)
    newest = dataclasses.replace(loaded, ref=dataclasses.replace(loaded.ref, id=loaded.ref.id + 2))
    pool.hold(newest, predictor_for(newest))
    with pytest.raises(RuntimeError, match="closed"):  # unheld when retired: closed at once
        new.submit(frame)
    pool.close()


# --- through the worker, on both backends -----------------------------------------------------


def _archive(db: Database, archive: Archive, seed: int) -> None:
    archive_stable(db, archive, phantom_dataset([make_phantom(seed, "heart")]), NOW)


def test_worker_slots_analyse_one_frame_studies_in_shared_batches(
    tmp_path: Path, db_url: str, model_file: Path
) -> None:
    settings = _settings(tmp_path, db_url, max_batch=4, max_wait_ms=5000)
    db = open_database(settings)
    ctx = WorkContext(settings, db, open_archive(settings), "test-worker")
    try:
        _activate(db, settings.storage.data_dir, model_file, "1")
        for seed in range(400, 408):
            _archive(db, ctx.archive, seed)
        worker = Worker(ctx, handlers={ANALYZE: HANDLERS[ANALYZE]})
        assert worker.slots == 4
        assert worker.run_once() and worker.run_once() and not worker.run_once()
        batcher = batcher_pool(ctx).batchers()["heart_view"]
        # Eight studies through four slots: two full batches of four, not eight of one.
        assert (batcher.stats.batches, batcher.stats.frames, batcher.stats.largest) == (2, 8, 4)
        with db.read() as session:
            jobs = session.execute(select(Job.state, Job.attempts).where(Job.kind == ANALYZE)).all()
            assert sorted(jobs) == [(JobState.DONE, 1)] * 8
            owners = set(session.scalars(select(JobResult.worker)))
            assert owners <= {f"test-worker/{slot}" for slot in range(4)} and len(owners) > 1
            findings = session.execute(
                select(Instance.path, Finding.probabilities).join(
                    Finding, Finding.instance_pk == Instance.id
                )
            ).all()
        assert len(findings) == 8
        loaded = ctx.model_cache.get("heart_view")
        params = clean_params(settings.pipeline)
        for path, probabilities in findings:
            frames: list[CleanFrame] = []
            analyze_instance(ctx.archive.absolute(path), params, sink=frames.append)
            np.testing.assert_allclose(probabilities, _direct(loaded, frames)[0], atol=1e-5)
    finally:
        if ctx.shared.batchers is not None:
            ctx.shared.batchers.close()
        db.dispose()


def test_each_job_keeps_its_own_lease(tmp_path: Path, db_url: str) -> None:
    """Another worker takes one of two jobs running side by side: that job alone stops and
    its result is dropped; the other completes."""
    settings = load_settings(
        None,
        storage={"data_dir": str(tmp_path / "data"), "min_free_space": 0},
        database={"url": db_url},
        queue={"workers": 0, "heartbeat_seconds": 0.1, "lease_seconds": 30},
    )
    db = open_database(settings)
    ctx = WorkContext(settings, db, open_archive(settings), "w")
    try:
        with db.write() as session:
            jobs = [queue.enqueue(session, PROBE, NOW, params={"seconds": 3.0}) for _ in range(2)]
            session.flush()
            stolen, kept = (j.id for j in jobs)
        worker = Worker(ctx, handlers={PROBE: _stop_when_lease_lost}, slots=2)
        thread = threading.Thread(target=worker.run_once)
        thread.start()
        deadline = time.monotonic() + 30
        while len(worker.running()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        lost = {r.job.id: r.ctx.lease_lost for r in worker.running()}
        with db.write() as session:
            session.execute(update(Job).where(Job.id == stolen).values(lease_owner="thief"))
        assert lost[stolen].wait(10)
        thread.join(30)
        assert not lost[kept].is_set()
        with db.read() as session:
            assert session.get(Job, kept).state is JobState.DONE  # type: ignore[union-attr]
            row = session.get(Job, stolen)
            assert row is not None and (row.state, row.lease_owner) == (JobState.RUNNING, "thief")
            done = list(session.scalars(select(JobResult.job_pk)))
            assert done == [kept]
            assert session.scalar(select(func.count()).select_from(JobResult)) == 1
    finally:
        db.dispose()


def _stop_when_lease_lost(ctx: WorkContext, job: queue.ClaimedJob) -> Outcome:
    ctx.lease_lost.wait(float(job.params["seconds"]))
    return Outcome(payload={"lost": ctx.lease_lost.is_set()})


def test_task_run_holds_the_batcher_until_the_job_ends(tmp_path: Path, model_file: Path) -> None:
    settings = _settings(tmp_path, f"sqlite:///{tmp_path / 'index.db'}", max_wait_ms=1)
    db = open_database(settings)
    ctx = WorkContext(settings, db, open_archive(settings), "w")
    try:
        _activate(db, settings.storage.data_dir, model_file, "1")
        loaded = model_cache(ctx).get("heart_view")
        assert loaded is not None
        job = ctx.for_job("w/0")
        run = task_run(job, loaded)
        assert run.batcher.max_batch == predictor_for(loaded).preferred_batch  # the default
        assert run.in_flight == 2 * run.batcher.max_batch
        pool = batcher_pool(ctx)
        assert batcher_pool(job) is pool and model_cache(job) is model_cache(ctx)
        job.job_exit.close()
        with pytest.raises(ValueError, match="not held"):
            pool.release(run.batcher)
        pool.close()
    finally:
        db.dispose()


def test_building_one_tasks_predictor_does_not_hold_up_another(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task whose predictor is still warming up (compiling, with ``models.compile``) leaves
    the process's other tasks free to get theirs; its own second caller waits and shares it."""
    slow = replace(loaded, task=replace(loaded.task, name="slow_task"))
    entered, release = threading.Event(), threading.Event()
    warm_up = Predictor.warm_up

    def blocking_warm_up(self: Predictor) -> None:
        if self.task.name == "slow_task":
            entered.set()
            assert release.wait(30)
        warm_up(self)

    monkeypatch.setattr(Predictor, "warm_up", blocking_warm_up)
    got: list[Predictor] = []
    builders = [threading.Thread(target=lambda: got.append(predictor_for(slow))) for _ in range(2)]
    for thread in builders:
        thread.start()
    try:
        assert entered.wait(30)
        # The slow task holds only its own lock: another task's predictor comes at once.
        other = threading.Thread(target=predictor_for, args=(loaded,))
        other.start()
        other.join(10)
        assert not other.is_alive()
        assert not got
    finally:
        release.set()
        for thread in builders:
            thread.join(30)
    assert len(got) == 2 and got[0] is got[1]


def test_a_busy_worker_defers_new_jobs_to_idler_ones(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each poll of a worker running n jobs asks only for jobs due n polls ago, so that a job
    that just became due goes to the least busy process polling the queue."""
    settings = load_settings(
        None,
        storage={"data_dir": str(tmp_path / "data"), "min_free_space": 0},
        database={"url": db_url},
        queue={"workers": 0, "poll_seconds": 0.05},
    )
    db = open_database(settings)
    ctx = WorkContext(settings, db, open_archive(settings), "w")
    worker = Worker(ctx, handlers={PROBE: _stop_when_lease_lost}, slots=3)
    asked: list[tuple[int, float]] = []
    claim = queue.claim

    def recording_claim(*args: object, **kwargs: Any) -> list[queue.ClaimedJob]:
        asked.append((len(worker.running()), kwargs["defer_seconds"]))
        return claim(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(queue, "claim", recording_claim)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    try:
        with db.write() as session:
            for _ in range(3):
                queue.enqueue(session, PROBE, datetime.now(UTC), params={"seconds": 1.0})
        thread.start()
        deadline = time.monotonic() + 30
        while len(worker.running()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(worker.running()) == 3
    finally:
        stop.set()
        thread.join(30)
        db.dispose()
    assert {busy for busy, _ in asked} >= {0, 1, 2}
    assert all(defer == pytest.approx(0.05 * busy) for busy, defer in asked)
