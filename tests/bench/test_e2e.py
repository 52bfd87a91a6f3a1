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
* **Throughput**, in ``USFMD_BENCH_E2E_ROUNDS`` rounds that alternate with model-only passes
  (M D M D M ...): each round sends ``USFMD_BENCH_E2E_CINES`` new phantom studies of one
  ``USFMD_BENCH_E2E_FRAMES``-frame 800×600 cine each in one ``dcmsend``, timed from the send until
  Orthanc holds every study's heatmap and SR. frames/s is given over that time minus the
  stability timeout (the daemon waits ``study.stable_seconds`` after a study's last image by
  design), and raw.
* **Model only**: the same model file through :class:`pipelines.infer.Predictor` on the first
  round's frames already preprocessed (``USFMD_BENCH_E2E_MODEL_ONLY_FRAMES``), at its preferred
  batch, between rounds while the daemon's processes are stopped (SIGSTOP: idle, they still
  poll), in two layouts: one process with every core,
  and (CPU) the daemon's own, ``WORKERS`` processes with its threads each at the same time. A
  round's ratio is its daemon frames/s over the better layout's mean of the passes just before
  and just after it: a shared VM's speed drifts by ~10 % over minutes, and only passes that
  bracket a round see the machine it ran on. The ratio printed is the median of the rounds'.
* **Latency**: ``USFMD_BENCH_E2E_LATENCY`` one-frame studies, one at a time: from the end of its
  C-STORE (``dcmsend`` returned) to its SR listed at Orthanc, minus ``study.stable_seconds``.

Goals (printed, not asserted: the machine is shared): daemon ≥ 85 % of model-only frames/s.
Asserted: every result arrived, one SR and one heatmap per study, SRs name the synthetic model.

Knobs: USFMD_BENCH_E2E_MODEL (``vit-b16`` | ``tiny``), USFMD_BENCH_E2E_ROUNDS (3),
USFMD_BENCH_E2E_CINES (8 per round), USFMD_BENCH_E2E_FRAMES (50),
USFMD_BENCH_E2E_MODEL_ONLY_FRAMES (128), USFMD_BENCH_E2E_LATENCY (5),
USFMD_BENCH_E2E_WORKERS (2), USFMD_BENCH_E2E_JOBS (queue.jobs_per_worker, 4),
USFMD_BENCH_E2E_THREADS (OMP_NUM_THREADS of the worker processes; default: usfmd's own, 1 per
process), USFMD_BENCH_E2E_STABLE (0.5 s),
USFMD_BENCH_E2E_COMPILE (1: ``models.compile`` on, and the model-only figure compiled too),
USFMD_BENCH_E2E_PROFILE (a file: py-spy's collapsed on-CPU stacks of the daemon's processes
during the throughput rounds; needs ``py-spy`` on PATH).
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
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
from pipelines.preprocess import PreprocessSpec, preprocess

from helpers import dcmtk, free_port, run_peer, wait_for
from orthanc_peer import Orthanc, run_orthanc

pytestmark = [pytest.mark.bench, pytest.mark.timeout(0)]

MODEL = os.environ.get("USFMD_BENCH_E2E_MODEL", "vit-b16")
ROUNDS = int(os.environ.get("USFMD_BENCH_E2E_ROUNDS", "3"))
#: 8 x 50 = 400 frames a round: ~25 s of steady state on a bf16 CPU (100 frames pass in a few s).
CINES = int(os.environ.get("USFMD_BENCH_E2E_CINES", "8"))
FRAMES = int(os.environ.get("USFMD_BENCH_E2E_FRAMES", "50"))
#: Frames per model-only pass: 8 batches of 16, ~40 s at fp32 on two AVX2 cores.
MODEL_ONLY_FRAMES = int(os.environ.get("USFMD_BENCH_E2E_MODEL_ONLY_FRAMES", "128"))
LATENCY = int(os.environ.get("USFMD_BENCH_E2E_LATENCY", "5"))
WORKERS = int(os.environ.get("USFMD_BENCH_E2E_WORKERS", "2"))
JOBS = int(os.environ.get("USFMD_BENCH_E2E_JOBS", "4"))
THREADS = os.environ.get("USFMD_BENCH_E2E_THREADS")
STABLE = float(os.environ.get("USFMD_BENCH_E2E_STABLE", "0.5"))
PROFILE = os.environ.get("USFMD_BENCH_E2E_PROFILE")
COMPILE = os.environ.get("USFMD_BENCH_E2E_COMPILE", "0") == "1"
#: s between the bench's polls of Orthanc while it times (REST calls of ~1 ms; wait_for's default
#: back-off to 0.25 s made a latency up to that much late).
POLL = 0.02
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
            [sys.executable, "-m", "daemon.cli", "serve"],
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,  # its own process group, for _frozen
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
def _frozen(serve: subprocess.Popen[bytes]) -> Iterator[None]:
    """The daemon and its worker processes stopped (SIGSTOP) while the block runs: between
    rounds it has no work, but its polling loops would still take CPU from a model-only pass."""
    os.killpg(serve.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(serve.pid, signal.SIGCONT)


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


def _process(owner: str) -> str:
    """The worker process (``host:pid:index``) of a job slot owner (``host:pid:index/slot``)."""
    return owner.rsplit("/", 1)[0]


def _workers_warm(db: Database) -> set[str]:
    """Worker processes that have finished an analysis."""
    with db.read() as session:
        owners = session.scalars(select(JobResult.worker).where(JobResult.kind == "analyze"))
        return {_process(o) for o in owners}


def _cines_per_process(db: Database) -> Counter[str]:
    """How many throughput cines each worker process analysed so far (a burst of a few long jobs
    can split unevenly; the less loaded process then idles before the end)."""
    split: Counter[str] = Counter()
    with db.read() as session:
        for worker, payload in session.execute(
            select(JobResult.worker, JobResult.payload).where(JobResult.kind == "analyze")
        ):
            findings = payload.get("findings", {}).values()
            if any(finding.get("frames") == FRAMES for finding in findings):
                split[_process(worker)] += 1
    return split


def _predictor(path: Path, inputs: np.ndarray) -> Predictor:
    """The model file as a worker process runs it (``bf16`` auto, compiled when asked), warmed
    up on a batch of ``inputs``."""
    loaded = load_model_file(path, device="cuda" if torch.cuda.is_available() else "cpu")
    predictor = Predictor(
        loaded.model,
        loaded.info.task,
        bf16="auto",
        input_size=loaded.info.preprocessing.size,
        compiled=COMPILE,
    )
    predictor.warm_up()
    predictor.predict(inputs[: predictor.preferred_batch])
    return predictor


def _timed_pass(predictor: Predictor, inputs: np.ndarray) -> float:
    """Seconds for one pass over ``inputs`` at the predictor's preferred batch."""
    batch = predictor.preferred_batch
    start = time.perf_counter()
    for first in range(0, len(inputs), batch):
        predictor.predict(inputs[first : first + batch])
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _layout_child(path: Path, inputs: np.ndarray, threads: int, conn: Connection) -> None:
    """One process of the daemon's layout: times a pass over its share whenever asked."""
    torch.set_num_threads(threads)
    predictor = _predictor(path, inputs)
    conn.send("ready")
    while conn.recv() == "run":
        conn.send(_timed_pass(predictor, inputs))


class _ModelOnly:
    """The model file alone on preprocessed frames, in two layouts, each loaded once.

    * one process with every core (what a single model needs to use the machine);
    * on CPU, the daemon's layout: ``WORKERS`` processes with its threads each, on their shares
      of the frames at the same time (two single-thread processes run fp32 ViT-B/16 faster than
      one with two threads on some CPUs: the fair ceiling for the daemon is the better one).
    """

    def __init__(self, path: Path, inputs: np.ndarray) -> None:
        self.inputs = inputs
        self.predictor = _predictor(path, inputs)
        self.threads = int(THREADS or 1)
        self.children: list[tuple[BaseProcess, Connection]] = []
        if self.predictor.device.type == "cpu" and WORKERS > 1:
            context = multiprocessing.get_context("spawn")
            for index in range(WORKERS):
                mine, theirs = context.Pipe()
                share = inputs[index::WORKERS]
                child = context.Process(
                    target=_layout_child, args=(path, share, self.threads, theirs), daemon=True
                )
                child.start()
                self.children.append((child, mine))
            for _, conn in self.children:
                assert conn.recv() == "ready"

    def rates(self) -> dict[str, float]:
        """Frames/s of one pass in each layout (one after the other)."""
        rates = {
            f"1 process x {torch.get_num_threads()} threads": len(self.inputs)
            / _timed_pass(self.predictor, self.inputs)
        }
        if self.children:
            for _, conn in self.children:
                conn.send("run")
            slowest = max(conn.recv() for _, conn in self.children)
            rates[f"{WORKERS} processes x {self.threads} thread"] = len(self.inputs) / slowest
        return rates

    def close(self) -> None:
        for child, conn in self.children:
            conn.send("stop")
            child.join(30)


@dataclass(frozen=True)
class _Round:
    elapsed: float  # s from the send to the last result at Orthanc
    sent: float  # s the dcmsend took
    split: list[int]  # cines per worker process, largest first
    model_before: dict[str, float]  # model-only frames/s per layout, just before the round
    model_after: dict[str, float]  # ... and just after

    @property
    def rate(self) -> float:
        """Daemon frames/s, minus the stability wait (a wait by design, not work)."""
        return CINES * FRAMES / max(self.elapsed - STABLE, 1e-9)

    @property
    def model_only(self) -> float:
        """The better layout's mean over the passes that bracket the round."""
        return max((self.model_before[k] + self.model_after[k]) / 2 for k in self.model_before)

    @property
    def ratio(self) -> float:
        return self.rate / self.model_only


def _write_inputs(
    directory: Path, seeds: range, spec: PreprocessSpec
) -> tuple[list[Path], list[np.ndarray]]:
    """One 800x600 ``FRAMES``-frame phantom cine study per seed, and its frames preprocessed."""
    files: list[Path] = []
    inputs: list[np.ndarray] = []
    for seed in seeds:
        samples = make_cine(seed, FRAMES, "heart")
        files.append(directory / f"cine-{seed}.dcm")
        write_phantom(files[-1], samples, transfer_syntax=ExplicitVRLittleEndian)
        inputs.extend(preprocess(s.annotated, spec) for s in samples)
    return files, inputs


def test_end_to_end_throughput_and_latency(tmp_path: Path) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    data = tmp_path / "data"
    model_path = _model_file(tmp_path / "bench-model.pt")
    frames_dir, warm_dir, latency_dir = (tmp_path / n for n in ("cines", "warm", "latency"))
    for directory in (frames_dir, warm_dir, latency_dir):
        directory.mkdir()
    spec = load_model_file(model_path).info.preprocessing
    rounds_files: list[list[Path]] = []
    for round_ in range(ROUNDS):
        seeds = range(9000 + round_ * CINES, 9000 + (round_ + 1) * CINES)
        files, inputs = _write_inputs(frames_dir, seeds, spec)
        rounds_files.append(files)
        if round_ == 0:
            model_only = _ModelOnly(model_path, np.stack(inputs[:MODEL_ONLY_FRAMES]))
    n_warm = WORKERS * JOBS
    warm = [warm_dir / f"warm-{i}.dcm" for i in range(3 * n_warm)]
    for i, path in enumerate(warm):
        write_phantom(path, [make_phantom(8000 + i, "heart")])
    probes = [latency_dir / f"one-{i}.dcm" for i in range(LATENCY)]
    for i, path in enumerate(probes):
        write_phantom(path, [make_phantom(7000 + i, "heart")])

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

            # Throughput: rounds of cines in one association each, until every heatmap and SR
            # is held, bracketed by model-only passes (the daemon is stopped during those).
            rounds: list[_Round] = []
            with _frozen(serve):
                model_rates = model_only.rates()
            done: Counter[str] = Counter()
            with _profiled(serve.pid):  # the daemon is stopped during model-only passes
                for files in rounds_files:
                    start = time.monotonic()
                    sent = _send(port, files)
                    expected += 2 * len(files)
                    wait_for(lambda n=expected: _held(pacs) >= n, 3600, "results", POLL)
                    elapsed = time.monotonic() - start
                    now = _cines_per_process(db)
                    split = sorted((now - done).values(), reverse=True)
                    done = now
                    with _frozen(serve):
                        before, model_rates = model_rates, model_only.rates()
                    rounds.append(_Round(elapsed, sent - start, split, before, model_rates))
            model_only.close()

            # Latency: one-frame studies one at a time, C-STORE done → SR listed at Orthanc.
            latencies = []
            for path in probes:
                study = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
                stored = _send(port, [path])
                wait_for(lambda s=study: _has_sr(pacs, s), 600, "the probe's SR", POLL)
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
    _report(rounds, latencies)


def _report(rounds: list[_Round], latencies: list[float]) -> None:
    load = os.getloadavg()
    total = CINES * FRAMES
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
        f"load per round: {CINES} studies x one {FRAMES}-frame 800x600 cine = {total} frames; "
        f"{len(rounds)} rounds, each between two model-only passes"
    )
    for number, r in enumerate(rounds, 1):
        print(
            f"round {number}: daemon {r.rate:.2f} frames/s ({total / r.elapsed:.2f} raw, "
            f"{r.elapsed:.2f} s, sent in {r.sent:.2f} s, cines per worker process {r.split})"
        )
        for layout in r.model_before:
            print(
                f"  model only, {layout}: {r.model_before[layout]:.2f} frames/s before, "
                f"{r.model_after[layout]:.2f} after"
            )
        print(f"  ratio {r.ratio:.1%} of the better layout ({r.model_only:.2f} frames/s)")
    ratios = np.array([r.ratio for r in rounds])
    print(
        f"ratio: median {np.median(ratios):.1%} of model-only (min {ratios.min():.1%}, "
        f"max {ratios.max():.1%}; goal >= 85 %)"
    )
    lat = np.array(latencies)
    print(
        f"latency, one-frame study, C-STORE done -> SR at Orthanc, minus {STABLE} s stable: "
        f"median {np.median(lat):.2f} s, min {lat.min():.2f}, max {lat.max():.2f} "
        f"({', '.join(f'{x:.2f}' for x in lat)})"
    )
    if PROFILE:
        seconds = profile_seconds(Path(PROFILE))
        total_cpu = sum(seconds.values())
        print(f"daemon CPU during the throughput rounds (py-spy, {total_cpu:.1f} s in all):")
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
