"""keep_freed_memory: a worker process that cleans frame after frame stops faulting in new pages.

Measured in a fresh interpreter that does nothing but clean (as a worker process): how much glibc
keeps of freed memory depends on what the process freed before, so the test process itself, which
generated phantoms, would show nothing either way.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.phantom import make_phantom
from pipelines.phantom.dicom import write_phantom

_WORKER = """
import resource, sys
import cv2
cv2.setNumThreads(1)
from pipelines.clean import clean_instance
from pipelines.memory import keep_freed_memory
from pipelines.preprocess import USF_MAE, preprocess
if sys.argv[1] == "keep":
    assert keep_freed_memory()
paths = sys.argv[2:]
def one_pass():
    frames = 0
    for path in paths:
        for clean in clean_instance(path):
            preprocess(clean.pixels, USF_MAE)
            frames += 1
    return frames
one_pass(), one_pass()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
frames = one_pass() + one_pass()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / frames)
"""


def _faults_per_frame(mode: str, paths: list[str]) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, mode, *paths],
        capture_output=True,
        text=True,
        check=True,
        env={"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_frames_reuse_freed_memory(tmp_path: Path) -> None:
    paths = []
    for seed in range(4):
        sample = make_phantom(seed, "head" if seed % 2 else "heart", style="colour")
        path = tmp_path / f"{seed}.dcm"
        write_phantom(path, [sample])
        paths.append(str(path))
    # Without it ~550 per frame here (glibc's adaptive defaults in a fresh process).
    assert _faults_per_frame("keep", paths) < 5
