"""End-to-end benchmark: frames/s through the whole daemon vs the model alone, and the latency
of a one-frame study's SR at the PACS.

Run:  TCP_NODELAY=1 pytest tests/bench/test_e2e.py -s -m bench
      USFMD_BENCH_E2E_MODEL=tiny TCP_NODELAY=1 pytest tests/bench/test_e2e.py -s -m bench  # quick
(tests/bench is outside the default testpaths; results go to stdout, see docs/benchmarks.md,
"End to end".)

One run, everything real: dcmtk ``dcmsend`` → ``usfmd serve`` (a subprocess: SQLite index,
``queue.workers`` worker processes with ``queue.jobs_per_worker`` job slots each, a dispatcher) →
heatmap Secondary Captures and TID 1500 SRs → a running Orthanc, checked over its REST API.

* **Model**: ``heart_view`` on ``usf-mae-vit-b16`` at its real ViT-B/16 size, **random weights**
  (a representative compute load, not a model of anything). Its file is written to the bench's
  temporary data directory only, marked synthetic, imported under the algorithm name
  ``usfmd synthetic benchmark model, random weights``, and deleted with the directory.
  ``USFMD_BENCH_E2E_MODEL=tiny``: the tiny encoder of the tests instead (a quick run).
* **Warm-up**: one-frame studies until every worker process has loaded the model (not timed).
* **Throughput**: ``USFMD_BENCH_E2E_CINES`` phantom studies of one ``USFMD_BENCH_E2E_FRAMES``-frame
  800×600 cine each, sent in one ``dcmsend``; timed from the send until Orthanc holds every
  study's heatmap and SR. frames/s is given over that time minus the stability timeout (the
  daemon waits ``study.stable_seconds`` after a study's last image by design), and raw.
* **Model only**: the same model file through :class:`pipelines.infer.Predictor` in this process,
  on the same cines' frames already preprocessed, at its preferred batch, with all cores; measured
  before and after the daemon run, the better kept (the fair ceiling on a shared machine).
* **Latency**: ``USFMD_BENCH_E2E_LATENCY`` one-frame studies, one at a time: from the end of its
  C-STORE (``dcmsend`` returned) to its SR listed at Orthanc, minus ``study.stable_seconds``.

Goals (printed, not asserted: the machine is shared): daemon ≥ 85 % of model-only frames/s.
Asserted: every result arrived, one SR and one heatmap per study, SRs name the synthetic model.

Knobs: USFMD_BENCH_E2E_MODEL (``vit-b16`` | ``tiny``), USFMD_BENCH_E2E_CINES (8),
USFMD_BENCH_E2E_FRAMES (50), USFMD_BENCH_E2E_LATENCY (5), USFMD_BENCH_E2E_WORKERS (2),
USFMD_BENCH_E2E_JOBS (queue.jobs_per_worker, 4), USFMD_BENCH_E2E_THREADS (OMP_NUM_THREADS of the
worker processes; default: usfmd's own, 1 per process), USFMD_BENCH_E2E_STABLE (0.5 s),
USFMD_BENCH_E2E_COMPILE (1: ``models.compile`` on, and the model-only figure compiled too),
USFMD_BENCH_E2E_PROFILE (a file: py-spy's collapsed on-CPU stacks of the daemon's processes
during the throughput phase; needs ``py-spy`` on PATH).
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select

from daemon.config import Settings, load_settings
from daemon.db import migrate
from daemon.db.engine import Database
from daemon.db.models import Instance, JobResult
from daemon.models import activate, import_model
from pipelines.infer import Predictor
from pipelines.models import build_task_model, get_encoder_card, save_model_file
from pipelines.models.modelfile import load_model_file
from pipelines.phantom import make_cine, make_phantom
from pipelines.phantom.dicom import write_phantom
from pipelines.preprocess import preprocess

from helpers import dcmtk, free_port, run_peer, wait_for
from orthanc_peer import Orthanc, run_orthanc

pytestmark = [pytest.mark.bench, pytest.mark.timeout(0)]

MODEL = os.environ.get("USFMD_BENCH_E2E_MODEL", "vit-b16")
#: 8 x 50 = 400 frames: ~25 s of steady state on a CPU (100 frames pass in a few seconds).
CINES = int(os.environ.get("USFMD_BENCH_E2E_CINES", "8"))
FRAMES = int(os.environ.get("USFMD_BENCH_E2E_FRAMES", "50"))
LATENCY = int(os.environ.get("USFMD_BENCH_E2E_LATENCY", "5"))
WORKERS = int(os.environ.get("USFMD_BENCH_E2E_WORKERS", "2"))
JOBS = int(os.environ.get("USFMD_BENCH_E2E_JOBS", "4"))
THREADS = os.environ.get("USFMD_BENCH_E2E_THREADS")
STABLE = float(os.environ.get("USFMD_BENCH_E2E_STABLE", "0.5"))
PROFILE = os.environ.get("USFMD_BENCH_E2E_PROFILE")
COMPILE = os.environ.get("USFMD_BENCH_E2E_COMPILE", "0") == "1"
ALGORITHM = "usfmd synthetic benchmark model, random weights"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def _model_file(path: Path) -> Path:
    """heart_view on usf-mae-vit-b16, random weights, marked synthetic (never a real model)."""
    if MODEL not in ("vit-b16", "tiny"):
        raise ValueError(f"USFMD_BENCH_E2E_MODEL={MODEL!r}: expected vit-b16 or tiny")
    overrides = dict(get_encoder_card("usf-mae-vit-b16").tiny_overrides) if MODEL == "tiny" else {}
    torch.manual_seed(0)
    model = build_task_model("heart_view", "usf-mae-vit-b16", overrides=overrides)
    save_model_file(path, model, synthetic=True, metadata={"benchmark": "random weights"})
    return path


def _settings(data: Path, port: int, pacs: Orthanc) -> tuple[Settings, dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("USFMD_")}
    values = {
        "STORAGE__DATA_DIR": str(data),
        "STORAGE__MIN_FREE_SPACE": "0",
        "DICOM__PORT": str(port),
        "LOGGING__LEVEL": "INFO",
        "STUDY__STABLE_SECONDS": str(STABLE),
        "STUDY__SWEEP_INTERVAL_SECONDS": "0.1",
        "QUEUE__WORKERS": str(WORKERS),
        "QUEUE__JOBS_PER_WORKER": str(JOBS),
        "QUEUE__POLL_SECONDS": "0.05",
        "MODELS__DEVICE": "cpu" if not torch.cuda.is_available() else "auto",
        "MODELS__COMPILE": "true" if COMPILE else "false",
        "ANALYSIS__ROUTES": '[{"task": "heart_view", "match": {"Modality": "US"}}]',
        "DISPATCH__POLL_SECONDS": "0.05",
        "DISPATCH__DESTINATIONS": (
            f'[{{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", '
            f'"port": {pacs.dicom_port}}}]'
        ),
    }
    env.update({f"USFMD_{k}": v for k, v in values.items()})
    env["TCP_NODELAY"] = "1"
    if THREADS:
        env["OMP_NUM_THREADS"] = THREADS
    settings = load_settings(
        None,
        storage={"data_dir": str(data), "min_free_space": 0},
        dicom={"port": port},
    )
    return settings, env


@contextmanager
def _serve(env: dict[str, str], log: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "serve"], env=env, stdout=out, stderr=out
        )

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"usfmd serve exited: {log.read_text()[-2000:]}")
        echo = subprocess.run(
            [dcmtk("echoscu"), "-aec", "USFMD", "127.0.0.1", str(port)],
            env=env,
            capture_output=True,
        )
        return echo.returncode == 0

    try:
        wait_for(ready, 60, "usfmd serve answering C-ECHO")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def _profiled(pid: int) -> Iterator[None]:
    """With USFMD_BENCH_E2E_PROFILE=<file>: py-spy samples the daemon and its worker processes
    (on-CPU stacks, collapsed format) while the block runs."""
    if not PROFILE:
        yield
        return
    spy = subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--subprocesses", "--format", "raw"]
        + ["--rate", "50", "--output", PROFILE],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        spy.wait(timeout=60)


#: Where the daemon's CPU goes, by the first frame of a sampled stack naming one of these
#: (checked in order: a model forward inside a job counts as the model).
_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model forward", ("Predictor._forward",)),
    ("Eigen-CAM maps", ("cam_maps",)),
    ("decode", ("iter_frames", "_raw_frames", "Decoder.")),
    ("scrub + inpaint", ("Cleaner.__call__",)),
    ("preprocess", ("preprocess (",)),
    ("heatmap SC + SR", ("build_heatmap_sc", "build_sr", "write_result")),
    ("receive (C-STORE SCP)", ("EventDUL", "reactor.py", "handle_store")),
    ("dispatch (C-STORE SCU)", ("dispatch",)),
    ("queue + index (SQL)", ("sqlalchemy", "queue.py")),
)


_WAITS = ("Condition.wait ", "Event.wait ", "_worker ", "select ", "_PollLikeSelector.select ")


def profile_seconds(path: Path, rate: float = 50.0) -> dict[str, float]:
    """On-CPU seconds per part of the daemon from py-spy's collapsed stacks (``--rate``)."""
    seconds: dict[str, float] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if frames[-1].startswith(_WAITS):
            continue  # a thread blocked in a wait that py-spy did not tell from running
        part = next(
            (name for name, keys in _PARTS if any(k in f for f in frames for k in keys)), "other"
        )
        seconds[part] = seconds.get(part, 0.0) + int(count) / rate
    return seconds


def _send(port: int, files: list[Path]) -> float:
    """dcmsend the files on one association; returns when it is done (monotonic time)."""
    sent = run_peer(
        [dcmtk("dcmsend"), "-aec", "USFMD", "127.0.0.1", str(port), *map(str, files)], timeout=600
    )
    assert sent.returncode == 0, sent.stderr
    return time.monotonic()


def _held(pacs: Orthanc) -> int:
    return int(pacs.rest("GET", "/statistics")["CountInstances"])


def _has_sr(pacs: Orthanc, study_uid: str) -> bool:
    found = pacs.rest(
        "POST",
        "/tools/find",
        {"Level": "Series", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}},
    )
    return bool(found)


def _workers_warm(db: Database) -> set[str]:
    """Worker processes (``host:pid:index``) that have finished an analysis."""
    with db.read() as session:
        owners = session.scalars(select(JobResult.worker).where(JobResult.kind == "analyze"))
        return {o.rsplit("/", 1)[0] for o in owners}


def _cine_split(db: Database) -> list[int]:
    """How many of the throughput cines each worker process analysed (a burst of a few long
    jobs can split unevenly; the less loaded process then idles before the end)."""
    split: dict[str, int] = {}
    with db.read() as session:
        for worker, payload in session.execute(
            select(JobResult.worker, JobResult.payload).where(JobResult.kind == "analyze")
        ):
            findings = payload.get("findings", {}).values()
            if any(finding.get("frames") == FRAMES for finding in findings):
                process = worker.rsplit("/", 1)[0]
                split[process] = split.get(process, 0) + 1
    return sorted(split.values(), reverse=True)


def _model_only(path: Path, inputs: np.ndarray) -> float:
    """Frames/s of the model file alone on preprocessed frames, preferred batch, all cores."""
    loaded = load_model_file(path, device="cuda" if torch.cuda.is_available() else "cpu")
    predictor = Predictor(
        loaded.model,
        loaded.info.task,
        bf16="auto",
        input_size=loaded.info.preprocessing.size,
        compiled=COMPILE,
    )
    predictor.warm_up()
    batch = predictor.preferred_batch
    predictor.predict(inputs[:batch])  # warm-up
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for first in range(0, len(inputs), batch):
        predictor.predict(inputs[first : first + batch])
    return len(inputs) / (time.perf_counter() - start)


def test_end_to_end_throughput_and_latency(tmp_path: Path) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    data = tmp_path / "data"
    model_path = _model_file(tmp_path / "bench-model.pt")
    frames_dir, warm_dir, latency_dir = (tmp_path / n for n in ("cines", "warm", "latency"))
    for directory in (frames_dir, warm_dir, latency_dir):
        directory.mkdir()
    cines: list[Path] = []
    inputs: list[np.ndarray] = []
    spec = load_model_file(model_path).info.preprocessing
    for index in range(CINES):
        samples = make_cine(9000 + index, FRAMES, "heart")
        cines.append(frames_dir / f"cine-{index}.dcm")
        write_phantom(cines[-1], samples, transfer_syntax=ExplicitVRLittleEndian)
        inputs.extend(preprocess(s.annotated, spec) for s in samples)
    batch_inputs = np.stack(inputs)
    n_warm = WORKERS * JOBS
    warm = [warm_dir / f"warm-{i}.dcm" for i in range(3 * n_warm)]
    for i, path in enumerate(warm):
        write_phantom(path, [make_phantom(8000 + i, "heart")])
    probes = [latency_dir / f"one-{i}.dcm" for i in range(LATENCY)]
    for i, path in enumerate(probes):
        write_phantom(path, [make_phantom(7000 + i, "heart")])

    before = _model_only(model_path, batch_inputs)

    port = free_port()
    with run_orthanc(tmp_path / "orthanc") as pacs:
        settings, env = _settings(data, port, pacs)
        db = Database(settings.database_url)
        migrate.upgrade(db.engine)
        with db.write() as session:
            version = import_model(
                session,
                model_path,
                version="bench-1",
                synthetic=True,
                data_dir=data,
                algorithm_name=ALGORITHM,
            )
            session.flush()
            activate(session, version.id, allow_synthetic=True)
        with _serve(env, tmp_path / "serve.log", port) as serve:
            # Warm-up: every worker process loads the model (hash + load), not timed.
            expected = 0
            for round_ in range(3):
                chunk = warm[round_ * n_warm : (round_ + 1) * n_warm]
                _send(port, chunk)
                expected += 2 * len(chunk)
                wait_for(lambda n=expected: _held(pacs) >= n, 600, "warm-up results at Orthanc")
                if len(_workers_warm(db)) >= WORKERS:
                    break

            # Throughput: the cines in one association, until every heatmap and SR is held.
            with _profiled(serve.pid):
                start = time.monotonic()
                sent = _send(port, cines)
                expected += 2 * CINES
                wait_for(lambda: _held(pacs) >= expected, 3600, "the cines' results at Orthanc")
                elapsed = time.monotonic() - start
            split = _cine_split(db)

            # Latency: one-frame studies one at a time, C-STORE done → SR listed at Orthanc.
            latencies = []
            for path in probes:
                study = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
                stored = _send(port, [path])
                wait_for(lambda s=study: _has_sr(pacs, s), 600, "the probe's SR")
                latencies.append(time.monotonic() - stored - STABLE)
                expected += 2

            # What Orthanc holds: one heatmap and one SR per study, nothing else.
            held: dict[str, int] = {}
            for orthanc_id in pacs.rest("GET", "/instances"):
                tags = pacs.rest("GET", f"/instances/{orthanc_id}/simplified-tags")
                held[tags["SOPClassUID"]] = held.get(tags["SOPClassUID"], 0) + 1
            studies = expected // 2
            assert held == {SR_CLASS: studies, SC_CLASS: studies}, held
            sr_files = _sr_paths(db)
        db.dispose()
    names = {_algorithm_name(Path(settings.storage.archive) / p) for p in sr_files}
    assert names == {ALGORITHM}, names

    after = _model_only(model_path, batch_inputs)
    model_only = max(before, after)
    total = CINES * FRAMES
    rate = total / max(elapsed - STABLE, 1e-9)
    raw = total / elapsed
    load = os.getloadavg()
    print()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(f"model: heart_view on usf-mae-vit-b16 ({MODEL}), random weights, synthetic")
    print(
        f"daemon: {WORKERS} worker processes x {JOBS} job slots, OMP_NUM_THREADS "
        f"{THREADS or 'usfmd default (1)'}, stable_seconds {STABLE}"
    )
    print(
        f"load: {CINES} studies x one {FRAMES}-frame 800x600 cine = {total} frames, "
        f"sent in {sent - start:.2f} s"
    )
    print(
        f"daemon end to end: {rate:.2f} frames/s (minus the stability timeout), "
        f"{raw:.2f} raw, {elapsed:.2f} s from send to the last result at Orthanc"
    )
    print(f"cines per worker process: {split}")
    print(f"model only: {model_only:.2f} frames/s (before {before:.2f}, after {after:.2f})")
    print(f"ratio: {rate / model_only:.1%} of model-only (goal >= 85 %)")
    lat = np.array(latencies)
    print(
        f"latency, one-frame study, C-STORE done -> SR at Orthanc, minus {STABLE} s stable: "
        f"median {np.median(lat):.2f} s, min {lat.min():.2f}, max {lat.max():.2f} "
        f"({', '.join(f'{x:.2f}' for x in lat)})"
    )
    if PROFILE:
        seconds = profile_seconds(Path(PROFILE))
        total_cpu = sum(seconds.values())
        print(f"daemon CPU during the throughput phase (py-spy, {total_cpu:.1f} s in all):")
        for part, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
            print(f"  {part:<34} {value:6.2f} s  {value / total_cpu:6.1%}")


def _sr_paths(db: Database) -> list[str]:
    with db.read() as session:
        return list(
            session.scalars(select(Instance.path).where(Instance.sop_class_uid == SR_CLASS))
        )


def _algorithm_name(path: Path) -> str:
    """TID 4019 Algorithm Name (DCM 111001) of an SR."""

    def walk(node: object) -> Iterator[str]:
        for item in getattr(node, "ContentSequence", []):
            names = item.get("ConceptNameCodeSequence", [])
            if names and names[0].CodeValue == "111001" and "TextValue" in item:
                yield str(item.TextValue)
            yield from walk(item)

    (name,) = set(walk(dcmread(path)))
    return name
