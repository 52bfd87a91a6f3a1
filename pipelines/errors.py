"""Errors the frame-level stages raise on purpose.

``pipelines`` may not import ``daemon`` (DESIGN.md §2), so it carries its own small hierarchy; the
daemon maps these onto job failures. Messages name the SOP Instance UID and what was expected,
never patient data, so they can be logged and stored in a job's ``last_error`` as they are.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error a pipeline stage raises deliberately."""


class DecodeError(PipelineError, ValueError):
    """A DICOM instance's pixel data cannot be turned into RGB frames.

    A ``ValueError`` too, because the input (not the environment) is at fault: retrying the same
    file gives the same answer, so a worker should fail the job rather than retry it.

    Parameters
    ----------
    reason
        What is wrong and what was expected, without patient data.
    sop_instance_uid
        SOP Instance UID (0008,0018) of the offending instance, ``""`` when unknown.
    frame_index
        0-based frame that failed, when the failure is specific to one frame.
    """

    def __init__(
        self, reason: str, *, sop_instance_uid: str = "", frame_index: int | None = None
    ) -> None:
        self.reason = reason
        self.sop_instance_uid = sop_instance_uid
        self.frame_index = frame_index
        where = f"SOP Instance {sop_instance_uid or '(unknown UID)'}"
        if frame_index is not None:
            where += f" frame {frame_index}"
        super().__init__(f"{where}: {reason}")
