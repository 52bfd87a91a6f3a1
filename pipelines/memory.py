"""Process-wide memory settings for processes that clean frame after frame.

Kept apart from the image stages: they are pure functions of arrays, while this changes how the
whole process allocates, so only a process's start-up code calls it (usfmd's worker processes,
the pipeline bench's workers).
"""

from __future__ import annotations

import ctypes
import platform
import sys
from typing import Final

#: glibc ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
#: Blocks up to this size come from the heap (32 MiB, the most glibc's own adaptive threshold
#: reaches): every per-frame array, and model batches of up to ~50 frames.
MMAP_THRESHOLD: Final = 32 * 1024 * 1024
#: Free memory at the top of a heap is given back to the kernel only above this.
TRIM_THRESHOLD: Final = 64 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Let this process reuse the memory of freed frames instead of faulting in fresh pages.

    Each frame allocates and frees megabyte-sized arrays (the decoded frame, HSV planes, masks,
    the model input). With glibc's adaptive defaults those blocks keep being unmapped or trimmed
    and mapped again, and every new page is faulted in on first touch: ~1,900 minor page faults
    per 800×600 frame, 13–17 % of the image stages' CPU time on the benchmark VM
    (tests/bench/test_pipeline.py). Fixed thresholds keep the blocks in the heap; a process then
    holds on to up to ``TRIM_THRESHOLD`` of freed memory per allocator arena.

    Call once when a worker process starts (usfmd's worker processes do). Process-wide, so it
    is never done on import.

    Returns
    -------
    bool
        Whether the allocator took the settings (``False`` where the C library is not glibc).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
