"""Check written objects with the standard's reference validators (DESIGN.md §4: zero errors).

``dciodvfy`` (dicom3tools) checks an object against its IOD, module by module; ``dsrdump``
(dcmtk) renders an SR's content tree the way other toolkits read it. Used by the tests and by
anyone who wants to vet an output before it is dispatched; the builders themselves stay pure.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: Full paths: the venv's pynetdicom scripts shadow dcmtk names on PATH (DESIGN.md §7).
DCIODVFY = Path("/usr/bin/dciodvfy")
DSRDUMP = Path("/usr/bin/dsrdump")


@dataclass(frozen=True, slots=True)
class Verdict:
    """dciodvfy's findings: lines starting ``Error`` and lines starting ``Warning``."""

    errors: tuple[str, ...]
    warnings: tuple[str, ...]


def _tool(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: install dicom3tools and dcmtk")
    return str(path)


def dciodvfy(path: str | os.PathLike[str], *, timeout: float = 60.0) -> Verdict:
    """Run dciodvfy on a DICOM Part 10 file.

    dciodvfy writes its findings to stderr as ``Error - ...`` / ``Warning - ...`` lines (some
    prefixed with the tag); everything else is its own progress output.
    """
    result = subprocess.run(
        [_tool(DCIODVFY), os.fspath(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = (result.stdout + "\n" + result.stderr).splitlines()
    errors = tuple(line for line in lines if "Error - " in line or line.startswith("Error"))
    warnings = tuple(line for line in lines if "Warning - " in line or line.startswith("Warning"))
    return Verdict(errors=errors, warnings=warnings)


def dsrdump(path: str | os.PathLike[str], *, timeout: float = 60.0) -> tuple[str, tuple[str, ...]]:
    """dsrdump's rendering of an SR with every code shown, and its diagnostics (stderr lines).

    Raises ``RuntimeError`` when dsrdump cannot read the file as an SR.
    """
    result = subprocess.run(
        [_tool(DSRDUMP), "+Pc", os.fspath(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"dsrdump failed on {path}: {result.stderr.strip()}")
    return result.stdout, tuple(line for line in result.stderr.splitlines() if line.strip())
