"""The rule that no frame with burned-in identifiers leaves unscrubbed (DESIGN.md §3).

A frame whose header says Burned In Annotation (0028,0301) = YES — or says nothing, which
:class:`~pipelines.frames.FrameMeta` treats as YES — may carry the patient's name in its pixels.
Every path that hands pixels on (inference inputs kept for review, training sets, exports) calls
:func:`require_scrubbed` with the report of *that* frame's scrub, and fails closed without one.
"""

from __future__ import annotations

from pipelines.errors import PipelineError
from pipelines.frames import FrameMeta
from pipelines.scrub.band import ScrubReport


class UnscrubbedFrameError(PipelineError, RuntimeError):
    """A frame flagged as carrying burned-in annotation was about to leave unscrubbed.

    A ``RuntimeError``: the caller skipped a stage, a bug to fix, not an input to reject.
    """


def require_scrubbed(meta: FrameMeta, report: ScrubReport | None) -> None:
    """Raise :class:`UnscrubbedFrameError` unless ``report`` proves this frame was scrubbed.

    Parameters
    ----------
    meta
        The frame about to leave.
    report
        What :func:`pipelines.scrub.scrub_band` returned for it; ``None`` when it was not run.
    """
    if not meta.burned_in_annotation:
        return
    where = f"SOP Instance {meta.sop_instance_uid} frame {meta.frame_index}"
    if report is None:
        raise UnscrubbedFrameError(
            f"{where}: Burned In Annotation is YES but the frame was not scrubbed; "
            "run scrub_band before it leaves the receive archive"
        )
    if (report.sop_instance_uid, report.frame_index) != (meta.sop_instance_uid, meta.frame_index):
        raise UnscrubbedFrameError(
            f"{where}: the scrub report belongs to SOP Instance {report.sop_instance_uid} "
            f"frame {report.frame_index}, not to this frame"
        )
