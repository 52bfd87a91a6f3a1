"""Ingest benchmark: usfmd vs dcmtk storescp vs Orthanc, same files, same sender, one run.

Run:  TCP_NODELAY=1 pytest tests/bench/test_ingest.py -s -m bench
(tests/bench is outside the default testpaths; the results go to stdout, see docs/benchmarks.md.)

One corpus of ultrasound-sized frames (800x600 RGB, uncompressed Explicit VR Little Endian,
Ultrasound Image Storage, speckle so nothing compresses trivially) is written once; then one
``/usr/bin/storescu`` invocation (one association, max PDU 131072) sends it to each receiver,
rounds interleaved, median taken. Every receiver runs at its largest max PDU:

* usfmd: ``usfmd serve`` in a subprocess (own GIL), default settings (SQLite index, two job
  workers), file + directory fsync and a ``synchronous=FULL`` commit before each Success;
  ``dicom.max_pdu`` 0 (unlimited, storescu then sends 128 KiB PDUs);
* dcmtk ``storescp --max-pdu 131072`` (writes files, no fsync, no index): the ceiling;
* Orthanc, ``MaximumPduLength`` 131072 (stores with ``SyncStorageArea`` fsync + SQLite index).

Only completeness is asserted (every file arrived at every receiver); speed goals are printed:
goal usfmd >= 2x Orthanc and >= 75% of storescp; must usfmd >= Orthanc. Each round also prints
the receiver's CPU time per file (its process and children, from /proc): less sensitive than
files/s to other processes sharing a small machine.

Knobs (environment): USFMD_BENCH_FILES (default 320), USFMD_BENCH_ROUNDS (default 3),
USFMD_BENCH_ONLY (comma list of usfmd,storescp,orthanc), USFMD_BENCH_BASELINE=<git revision> adds
a receiver ``usfmd@rev``: the daemon/ and migrations/ of that revision (``git archive``) run the
same way, for before/after in one run, USFMD_BENCH_PYSPY=out.json (speedscope)
or out.txt (collapsed stacks) attaches py-spy to usfmd (``pip install py-spy``): every thread,
idle ones included, sampled without pausing the process.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from helpers import cpu_model, free_port
from orthanc_peer import run_orthanc

pytestmark = pytest.mark.bench

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
ROWS, COLUMNS = 600, 800
MAX_PDU = 131072  # dcmtk's and Orthanc's largest; usfmd accepts any size (dicom.max_pdu = 0)
N_FILES = int(os.environ.get("USFMD_BENCH_FILES", "320"))
ROUNDS = int(os.environ.get("USFMD_BENCH_ROUNDS", "3"))
ONLY = [s for s in os.environ.get("USFMD_BENCH_ONLY", "usfmd,storescp,orthanc").split(",") if s]
PYSPY = os.environ.get("USFMD_BENCH_PYSPY")
BASELINE = os.environ.get("USFMD_BENCH_BASELINE")
REPO = Path(__file__).resolve().parents[2]
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
STORESCP = "/usr/bin/storescp"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


# -- corpus ---------------------------------------------------------------------------------------
def _frame(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """A B-mode-like RGB frame: fan-shaped echo texture times Rayleigh speckle, small colour box."""
    speckle = rng.rayleigh(scale=0.6, size=(ROWS, COLUMNS)).astype(np.float32)
    gray = np.clip(base * speckle * 255.0, 0, 255)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    rgb += rng.normal(0.0, 3.0, size=rgb.shape).astype(np.float32)  # per-channel noise
    y, x = rng.integers(100, 400), rng.integers(150, 550)  # a colour-Doppler box
    rgb[y : y + 80, x : x + 100, 0] += rng.uniform(0, 120, size=(80, 100)).astype(np.float32)
    rgb[y : y + 80, x : x + 100, 2] += rng.uniform(0, 120, size=(80, 100)).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _fan() -> np.ndarray:
    yy, xx = np.mgrid[0:ROWS, 0:COLUMNS].astype(np.float32)
    cx, top = COLUMNS / 2, -40.0
    radius = np.hypot(xx - cx, yy - top)
    angle = np.arctan2(xx - cx, yy - top)
    inside = (np.abs(angle) < 0.75) & (radius > 60) & (radius < ROWS + 20)
    depth_gain = np.exp(-radius / 900.0)
    layers = 0.55 + 0.35 * np.sin(radius / 23.0) * np.cos(angle * 7.0)
    return (inside * depth_gain * layers).astype(np.float32)


def write_corpus(directory: Path, n_files: int, seed: int = 20240601) -> list[Path]:
    """Write ``n_files`` distinct US frames: 8 patients/studies, 2 series each, files shared out."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = _fan()
    studies = [(generate_uid(), [generate_uid(), generate_uid()]) for _ in range(8)]
    paths = []
    for i in range(n_files):
        study_index, series_index = i % 8, (i // 8) % 2
        study_uid, series_uids = studies[study_index]
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = US_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = US_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uids[series_index]
        ds.PatientID = f"BENCH{study_index:03d}"
        ds.PatientName = f"Bench^Patient{study_index}"
        ds.PatientBirthDate = "19900101"
        ds.PatientSex = "F"
        ds.StudyDate = "20240601"
        ds.StudyTime = "120000"
        ds.AccessionNumber = f"ACC{study_index:05d}"
        ds.StudyID = str(study_index)
        ds.Modality = "US"
        ds.Manufacturer = "BenchCo"
        ds.ManufacturerModelName = "Synthetic"
        ds.SeriesNumber = series_index + 1
        ds.InstanceNumber = i + 1
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.Rows, ds.Columns = ROWS, COLUMNS
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = _frame(rng, base).tobytes()
        path = directory / f"us{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# -- receivers ------------------------------------------------------------------------------------
def _echo_ok(port: int, aet: str) -> bool:
    r = subprocess.run(
        [ECHOSCU, "-aec", aet, "127.0.0.1", str(port)], env=PEER_ENV, capture_output=True
    )
    return r.returncode == 0


def _wait_ready(proc: subprocess.Popen[bytes], port: int, aet: str, what: str) -> None:
    deadline = time.monotonic() + 30
    while not _echo_ok(port, aet):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        if time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"{what} not answering C-ECHO on port {port}")
        time.sleep(0.05)
    _settle(proc)


def _cpu_ticks(pid: int) -> int:
    """CPU time (clock ticks) of a process and all its descendants, from /proc."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (OSError, IndexError, ValueError):
            continue
        todo.extend(int(c) for c in children)
    return total


def _settle(proc: subprocess.Popen[bytes], limit: float = 20.0) -> None:
    """Wait until a receiver (and e.g. usfmd's worker processes) stops using CPU after start-up,
    so that its start-up does not compete with the transfer on a small machine."""
    deadline = time.monotonic() + limit
    ticks = _cpu_ticks(proc.pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = _cpu_ticks(proc.pid)
        if now - ticks <= 5:  # under 10% of one core over half a second
            return
        ticks = now


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Receiver:
    """A started receiver: where to send, how to count what arrived, how to stop it."""

    aet: str
    port: int
    count: Callable[[], int]
    stop: Callable[[], None]
    #: The receiving process, for its CPU time per file (less sensitive to other load).
    pid: int


def start_usfmd(work: Path, code: Path | None = None) -> Receiver:
    """``usfmd serve`` from this checkout, or from ``code`` (a tree with daemon/, migrations/)."""
    port = free_port()
    data = work / "usfmd"
    env = {
        **os.environ,
        "USFMD_STORAGE__DATA_DIR": str(data),
        "USFMD_STORAGE__MIN_FREE_SPACE": "0",
        "USFMD_DICOM__PORT": str(port),
        "USFMD_DICOM__MAX_PDU": "0",
        "USFMD_LOGGING__LEVEL": "WARNING",
        # Receive only: serve's analysis worker processes would spend their start-up (seconds of
        # imports) on the same two cores during each short round; analysis has its own bench.
        "USFMD_QUEUE__WORKERS": "0",
    }
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        cwd=code or REPO,
    )
    _wait_ready(proc, port, "USFMD", "usfmd")
    spy = None
    if PYSPY:
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        # --idle keeps threads blocked in fsync/recv/sleep; --threads gives one track each.
        # --nonblocking: sample without pausing usfmd, so it runs at (nearly) full speed.
        form = "speedscope" if PYSPY.endswith(".json") else "raw"
        spy = subprocess.Popen(
            [pyspy, "record", "--pid", str(proc.pid), "--threads", "--idle", "--nonblocking",
             "--rate", "500", "--format", form, "-o", PYSPY],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.0)  # let py-spy attach before storescu starts

    def count() -> int:
        with sqlite3.connect(data / "usfmd.db") as db:
            rows = int(db.execute("SELECT count(*) FROM instances").fetchone()[0])
        files = sum(1 for p in (data / "archive").rglob("*.dcm") if ".incoming" not in p.parts)
        return min(rows, files)

    def stop() -> None:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
            spy.wait(timeout=60)
        _stop(proc)

    return Receiver("USFMD", port, count, stop, proc.pid)


def start_storescp(work: Path) -> Receiver:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        [STORESCP, "--max-pdu", str(MAX_PDU), "-aet", "STORESCP", "-od", str(out), str(port)],
        env=PEER_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_ready(proc, port, "STORESCP", "storescp")
    return Receiver(
        "STORESCP", port, lambda: sum(1 for _ in out.iterdir()), lambda: _stop(proc), proc.pid
    )


def start_orthanc(work: Path) -> Receiver:
    stack = ExitStack()
    # No stable-study work during the run.
    peer = stack.enter_context(run_orthanc(work / "orthanc", max_pdu=MAX_PDU, StableAge=3600))

    def count() -> int:
        return int(peer.rest("GET", "/statistics")["CountInstances"])

    return Receiver("ORTHANC", peer.dicom_port, count, stack.close, peer.process.pid)


STARTERS: dict[str, Callable[[Path], Receiver]] = {
    "usfmd": start_usfmd,
    "storescp": start_storescp,
    "orthanc": start_orthanc,
}


def _baseline_code(revision: str, into: Path) -> Path:
    """Extract daemon/ and migrations/ of ``revision`` into ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "daemon", "migrations"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


if BASELINE:
    ONLY.append(f"usfmd@{BASELINE}")


def send_all(corpus: Path, receiver: Receiver) -> float:
    """One storescu, one association, every file; return the wall time in seconds."""
    command = [
        STORESCU,
        "--max-pdu", str(MAX_PDU),  # what storescu receives; it sends at the receiver's max
        "-aec", receiver.aet,
        "--scan-directories", "--scan-pattern", "*.dcm",
        "127.0.0.1", str(receiver.port), str(corpus),
    ]  # fmt: skip
    start = time.perf_counter()
    r = subprocess.run(command, env=PEER_ENV, capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - start
    assert r.returncode == 0, f"storescu to {receiver.aet} failed: {r.stderr[-2000:]}"
    return elapsed


def one_round(name: str, corpus: Path, work: Path) -> tuple[float, int, float]:
    """(seconds, files arrived, receiver CPU seconds) of one transfer to a fresh receiver."""
    target = work / name.replace("@", "-")  # no "@": it would be %-encoded in the SQLite URL
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    os.sync()  # earlier rounds' dirty pages must not be written back during this one
    if name.startswith("usfmd@"):
        code = _baseline_code(name.split("@", 1)[1], work / f"code-{target.name}")
        receiver = start_usfmd(target, code)
    else:
        receiver = STARTERS[name](target)
    try:
        ticks = _cpu_ticks(receiver.pid)
        elapsed = send_all(corpus, receiver)
        cpu = (_cpu_ticks(receiver.pid) - ticks) / os.sysconf("SC_CLK_TCK")
        arrived = receiver.count()
    finally:
        receiver.stop()
        shutil.rmtree(target, ignore_errors=True)
    return elapsed, arrived, cpu


# -- the benchmark --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("ingest-corpus")
    started = time.perf_counter()
    paths = write_corpus(directory, N_FILES)
    size = sum(p.stat().st_size for p in paths)
    print(
        f"\ncorpus: {len(paths)} files, {size / len(paths) / 1e6:.2f} MB each, "
        f"written in {time.perf_counter() - started:.1f} s"
    )
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


@pytest.mark.timeout(3600)
def test_ingest_throughput(corpus: Path, tmp_path: Path) -> None:
    for tool in (STORESCU, ECHOSCU, STORESCP, ORTHANC):
        if not Path(tool).exists():
            pytest.skip(f"{tool} missing: apt-get install dcmtk orthanc")
    times: dict[str, list[float]] = {name: [] for name in ONLY}
    cpus: dict[str, list[float]] = {name: [] for name in ONLY}
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.platform()}, {cpu_model()}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    for round_no in range(1, ROUNDS + 1):
        for name in ONLY:
            elapsed, arrived, cpu = one_round(name, corpus, tmp_path)
            print(
                f"round {round_no} {name:<8} {elapsed:6.2f} s  {N_FILES / elapsed:7.1f} files/s"
                f"  CPU {cpu / N_FILES * 1e3:5.2f} ms/file  ({arrived}/{N_FILES} arrived,"
                f" load {os.getloadavg()[0]:.1f})"
            )
            # The floor that proves the benchmark ran: every file arrived (and, for usfmd,
            # is archived and indexed).
            assert arrived == N_FILES, f"{name}: only {arrived} of {N_FILES} files arrived"
            times[name].append(elapsed)
            cpus[name].append(cpu)

    rate = {name: N_FILES / statistics.median(t) for name, t in times.items()}
    mb = N_FILES * (ROWS * COLUMNS * 3) / 1e6
    print(f"\n== ingest, {N_FILES} files x 1.44 MB, median of {ROUNDS} rounds, storescu 1 assoc")
    for name, r in rate.items():
        rounds = " ".join(f"{N_FILES / t:.1f}" for t in times[name])
        cpu_ms = statistics.median(cpus[name]) / N_FILES * 1e3
        print(
            f"{name:<8} {r:7.1f} files/s  {r * mb / N_FILES:6.1f} MB/s  receiver CPU"
            f" {cpu_ms:5.2f} ms/file  (rounds: {rounds})"
        )
    if {"usfmd", "orthanc", "storescp"} <= rate.keys():
        vs_orthanc = rate["usfmd"] / rate["orthanc"]
        vs_storescp = rate["usfmd"] / rate["storescp"]
        print(f"usfmd/Orthanc  = {vs_orthanc:.2f}x   (goal >= 2.00x: {_verdict(vs_orthanc >= 2)};"
              f" must >= 1.00x: {_verdict(vs_orthanc >= 1)})")  # fmt: skip
        print(f"usfmd/storescp = {vs_storescp:.0%}    (goal >= 75%: "
              f"{_verdict(vs_storescp >= 0.75)})")  # fmt: skip
    for name in rate:
        if name.startswith("usfmd@") and "usfmd" in rate:
            print(f"usfmd/{name} = {rate['usfmd'] / rate[name]:.2f}x (this checkout vs {name})")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
