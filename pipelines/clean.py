"""Clean: a decoded frame in, the frame a model may see out — scrubbed, then inpainted.

The composition every consumer of pixels uses, the daemon's ``analyze`` job and the trainer alike
(DESIGN.md §2-3), so that a model is trained on frames prepared exactly as in production:

1. **scrub** — blank the burned-in patient strip: the height configured for the scanner's
   manufacturer / model, else the one detected on the instance's first frame (the strip does not
   move within a cine, so one decision serves every frame; :func:`pipelines.scrub.decide_band`);
2. **inpaint** — mask calipers, text and markers and fill them (:mod:`pipelines.inpaint`).

A frame flagged Burned In Annotation (0028,0301) YES never leaves :class:`Cleaner` without a
scrub report of its own (:func:`pipelines.scrub.require_scrubbed` is the last step).
:func:`clean_instance` streams a whole DICOM instance through decode and clean, one frame in
memory at a time.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from pipelines.decode import RGBFrame, Source, iter_frames
from pipelines.errors import PipelineError
from pipelines.frames import FrameMeta
from pipelines.inpaint import InpaintParams, annotation_mask
from pipelines.inpaint.fill import fill_navier_stokes
from pipelines.scrub import ScrubParams, ScrubReport, require_scrubbed
from pipelines.scrub.band import BandDecision, apply_band, decide_band


class NoStripConfigured(PipelineError, ValueError):
    """Strip detection is off and no strip is configured for the scanner of a frame that
    may carry burned-in identifiers: it cannot be cleaned (configure one, or allow detection)."""


class TooMuchToInpaint(PipelineError, ValueError):
    """More of a frame would be inpainted than ``CleanParams.max_inpainted_fraction`` allows.

    The papers' mask takes every saturated pixel for an annotation. On a colour-filled or tinted
    image (a colour map over the whole sector, a test pattern) that is most of the frame, and the
    fill would invent it from the few grey pixels left: nothing a model may be shown. The frame
    is refused instead; the instance fails with this message (its input is at fault: a retry
    gives the same answer).
    """


@dataclass(frozen=True, slots=True)
class CleanParams:
    """Everything the clean stage depends on (the daemon builds it from ``[pipeline]``).

    Attributes
    ----------
    scrub
        Configured strips per scanner and the detection thresholds.
    inpaint
        Mask detection thresholds, kernels and the Navier–Stokes radius.
    detect_band
        Detect the strip of scanners without a configured one. When off, such frames fail with
        :class:`NoStripConfigured` — unless their header says Burned In Annotation NO, in which
        case they pass unscrubbed.
    max_inpainted_fraction
        Refuse a frame (:class:`TooMuchToInpaint`) whose inpainting mask covers more than this
        share of it; ``None``: never. Annotated B-mode masks 1-13 % (phantoms at most 2 %, the
        real corpus's colour Doppler frame 20 %); the two corpus frames above 25 % are a
        yellow-mapped sector (96 %) and a blue-filled test frame (38 %).
    """

    scrub: ScrubParams = field(default_factory=ScrubParams)
    inpaint: InpaintParams = field(default_factory=InpaintParams)
    detect_band: bool = True
    max_inpainted_fraction: float | None = 0.25

    def __post_init__(self) -> None:
        limit = self.max_inpainted_fraction
        if limit is not None and not 0.0 < limit <= 1.0:
            raise ValueError(f"max_inpainted_fraction={limit}: expected 0 < value <= 1, or None")


@dataclass(frozen=True, slots=True)
class CleanReport:
    """What the clean stage did to one frame, and what it cost (milliseconds, wall clock)."""

    frame_index: int
    #: ``"configured"``, ``"detected"`` or ``"none"`` (not scrubbed: see ``CleanParams``).
    band_method: str
    #: Rows ``[0, band_rows)`` were blanked.
    band_rows: int
    #: Share of the frame's pixels replaced by inpainting.
    masked_fraction: float
    scrub_ms: float
    inpaint_ms: float
    #: Time to decode the frame, when it came through :func:`clean_instance`.
    decode_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class CleanFrame:
    """A clean frame: read-only ``(rows, columns, 3)`` uint8 RGB, its metadata and reports."""

    pixels: RGBFrame
    meta: FrameMeta
    #: The frame's own scrub report (``None`` only when it needed none: see ``CleanParams``).
    scrub: ScrubReport | None
    report: CleanReport


class Cleaner:
    """Cleans the frames of one instance after another; keeps the strip decision per instance.

    Parameters
    ----------
    params
        The clean stage's settings.
    """

    def __init__(self, params: CleanParams | None = None) -> None:
        self.params = params or CleanParams()
        #: ``(SOP Instance UID, frame shape)`` the kept decision belongs to.
        self._decided_for: tuple[str, tuple[int, ...]] | None = None
        self._decision: BandDecision | None = None

    def _decide(self, frame: RGBFrame, meta: FrameMeta) -> BandDecision | None:
        key = (meta.sop_instance_uid, frame.shape)
        if self._decided_for == key:
            return self._decision
        params = self.params
        configured = params.scrub.configured_strip(meta.manufacturer, meta.model_name)
        decision: BandDecision | None
        if configured is None and not params.detect_band:
            if meta.burned_in_annotation:
                raise NoStripConfigured(
                    f"SOP Instance {meta.sop_instance_uid}: Burned In Annotation is not NO, "
                    f"no PHI strip is configured for manufacturer {meta.manufacturer!r} model "
                    f"{meta.model_name!r}, and pipeline.detect_band is off"
                )
            decision = None
        else:
            decision = decide_band(frame, meta, params.scrub)
        self._decided_for, self._decision = key, decision
        return decision

    def __call__(self, frame: RGBFrame, meta: FrameMeta, *, owned: bool = False) -> CleanFrame:
        """Scrub and inpaint one frame.

        Parameters
        ----------
        frame
            ``(rows, columns, 3)`` uint8 RGB from :func:`pipelines.decode.iter_frames`.
        meta
            Its metadata; frames of one SOP Instance share the strip decided on the first.
        owned
            The caller hands the frame over (e.g. fresh from decode): it is scrubbed in place
            instead of copied.

        Raises
        ------
        NoStripConfigured
            See :class:`CleanParams`.
        TooMuchToInpaint
            The mask covers more than ``max_inpainted_fraction`` of the frame.
        pipelines.scrub.UnscrubbedFrameError
            The frame would leave with burned-in identifiers unscrubbed (a bug, never expected).
        """
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"frame {frame.shape} {frame.dtype}: expected (rows, columns, 3)")
        start = time.perf_counter()
        decision = self._decide(frame, meta)
        scrub_report: ScrubReport | None = None
        scrubbed = frame if owned and frame.flags.writeable else frame.copy()
        if decision is not None:
            scrubbed, scrub_report = apply_band(
                scrubbed, meta, decision, self.params.scrub, in_place=True
            )
        scrubbed_at = time.perf_counter()
        mask = annotation_mask(scrubbed, self.params.inpaint, lossy=meta.lossy)
        masked_fraction = cv2.countNonZero(mask.view(np.uint8)) / mask.size
        self._check_masked(masked_fraction, meta)
        clean = fill_navier_stokes(scrubbed, mask, self.params.inpaint.radius, in_place=True)
        done = time.perf_counter()
        # The last step before pixels leave: fails closed on a frame that escaped its scrub.
        require_scrubbed(meta, scrub_report)
        clean.setflags(write=False)
        report = CleanReport(
            frame_index=meta.frame_index,
            band_method=decision.method if decision is not None else "none",
            band_rows=decision.band_height if decision is not None else 0,
            masked_fraction=masked_fraction,
            scrub_ms=(scrubbed_at - start) * 1000.0,
            inpaint_ms=(done - scrubbed_at) * 1000.0,
        )
        return CleanFrame(clean, meta, scrub_report, report)

    def _check_masked(self, fraction: float, meta: FrameMeta) -> None:
        limit = self.params.max_inpainted_fraction
        if limit is not None and fraction > limit:
            raise TooMuchToInpaint(
                f"SOP Instance {meta.sop_instance_uid} frame {meta.frame_index}: "
                f"{fraction:.1%} of the frame would be inpainted, more than the "
                f"{limit:.0%} allowed (pipeline.max_inpainted_fraction): a colour-filled or "
                "tinted image that inpainting cannot clean"
            )


def clean_frames(
    frames: Iterable[tuple[RGBFrame, FrameMeta]], params: CleanParams | None = None
) -> Generator[CleanFrame, None, None]:
    """Clean a stream of decoded frames (consumed: each is scrubbed in place)."""
    cleaner = Cleaner(params)
    for frame, meta in frames:
        yield cleaner(frame, meta, owned=True)


def clean_instance(
    source: Source,
    params: CleanParams | None = None,
    *,
    indices: Iterable[int] | None = None,
) -> Generator[CleanFrame, None, None]:
    """Decode and clean one DICOM instance frame by frame (a cine is never held whole).

    Parameters
    ----------
    source
        Path to a DICOM Part 10 file, or a dataset in memory.
    params
        The clean stage's settings.
    indices
        Frames to produce, in this order; all when ``None``.

    Raises
    ------
    pipelines.errors.DecodeError
        The pixel data cannot be decoded (names the SOP Instance UID, never the patient).
    NoStripConfigured
        See :class:`CleanParams`.
    """
    cleaner = Cleaner(params)
    frames = iter_frames(source, indices=indices)
    try:
        while True:
            started = time.perf_counter()
            try:
                frame, meta = next(frames)
            except StopIteration:
                return
            decode_ms = (time.perf_counter() - started) * 1000.0
            cleaned = cleaner(frame, meta, owned=True)
            yield replace(cleaned, report=replace(cleaned.report, decode_ms=decode_ms))
    finally:
        frames.close()


@dataclass
class InstanceSummary:
    """What the clean stage did to a whole instance: the ``analyze`` job's stage report.

    Holds no pixels and no patient data: frame geometry, the strip decision, the share of pixels
    inpainted, and per-stage milliseconds (total and per frame).
    """

    frames: int = 0
    rows: int = 0
    columns: int = 0
    photometric_interpretation: str = ""
    transfer_syntax_uid: str = ""
    lossy: bool = False
    burned_in_annotation: bool = True
    band_method: str = ""
    band_rows: int = 0
    band_region_source: str = ""
    masked_fraction_sum: float = 0.0
    masked_fraction_max: float = 0.0
    decode_ms: float = 0.0
    scrub_ms: float = 0.0
    inpaint_ms: float = 0.0

    def add(self, frame: CleanFrame) -> None:
        meta, report = frame.meta, frame.report
        if not self.frames:
            self.rows, self.columns = meta.rows, meta.columns
            self.photometric_interpretation = meta.photometric_interpretation
            self.transfer_syntax_uid = meta.transfer_syntax_uid
            self.lossy = meta.lossy
            self.burned_in_annotation = meta.burned_in_annotation
            self.band_method, self.band_rows = report.band_method, report.band_rows
            self.band_region_source = frame.scrub.region_source if frame.scrub else ""
        self.frames += 1
        self.masked_fraction_sum += report.masked_fraction
        self.masked_fraction_max = max(self.masked_fraction_max, report.masked_fraction)
        self.decode_ms += report.decode_ms
        self.scrub_ms += report.scrub_ms
        self.inpaint_ms += report.inpaint_ms

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: what a job's result payload carries."""
        n = max(self.frames, 1)
        total = self.decode_ms + self.scrub_ms + self.inpaint_ms
        stages = {"decode": self.decode_ms, "scrub": self.scrub_ms, "inpaint": self.inpaint_ms}
        return {
            "frames": self.frames,
            "rows": self.rows,
            "columns": self.columns,
            "photometric_interpretation": self.photometric_interpretation,
            "transfer_syntax_uid": self.transfer_syntax_uid,
            "lossy": self.lossy,
            "burned_in_annotation": self.burned_in_annotation,
            "band": {
                "method": self.band_method,
                "rows": self.band_rows,
                "region_source": self.band_region_source,
            },
            "masked_fraction": {
                "mean": round(self.masked_fraction_sum / n, 6),
                "max": round(self.masked_fraction_max, 6),
            },
            "ms": {name: round(value, 3) for name, value in stages.items()}
            | {"total": round(total, 3)},
            "ms_per_frame": {name: round(value / n, 3) for name, value in stages.items()}
            | {"total": round(total / n, 3)},
        }
