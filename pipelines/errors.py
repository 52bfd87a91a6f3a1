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


class ModelLoadError(PipelineError, ValueError):
    """An encoder, checkpoint or usfmd model file cannot be used as asked: never a random fallback.

    A ``ValueError`` too: the name, file or configuration is at fault, so retrying gives the same
    answer. Messages name the file and encoder and, for a checkpoint that does not fit, the
    missing and unexpected keys and the shape mismatches (also kept as attributes).

    Parameters
    ----------
    reason
        What is wrong and what was expected.
    missing, unexpected
        State-dict keys the model needs but the checkpoint lacks, and the reverse.
    mismatched
        ``(key, checkpoint shape, model shape)`` for keys present in both with different shapes.
    """

    #: How many keys of each kind a message lists before it says "... and N more".
    SHOWN = 8

    def __init__(
        self,
        reason: str,
        *,
        missing: tuple[str, ...] = (),
        unexpected: tuple[str, ...] = (),
        mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = (),
    ) -> None:
        self.reason = reason
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        parts = [reason]
        if missing:
            parts.append(f"{len(missing)} missing key(s): {self._shown(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {self._shown(unexpected)}")
        if mismatched:
            shapes = tuple(
                f"{key} (checkpoint {list(got)}, model {list(want)})"
                for key, got, want in mismatched
            )
            parts.append(f"{len(mismatched)} shape mismatch(es): {self._shown(shapes)}")
        super().__init__("; ".join(parts))

    @classmethod
    def _shown(cls, items: tuple[str, ...]) -> str:
        head = ", ".join(items[: cls.SHOWN])
        more = len(items) - cls.SHOWN
        return f"{head}, ... and {more} more" if more > 0 else head
