"""What a result is built from: the source image, the finding on it, and the algorithm that made it.

Each dataclass validates on construction and raises ``ValueError`` naming the field and the rule
(the highdicom way, DESIGN.md §6): an SR or heatmap is built only from inputs that make sense, so
the builders need not second-guess them. Messages quote UIDs, task and class names — never patient
data — so they can be logged and stored as a job's last error as they are.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
)

from pipelines.decode.frames import LOSSY_TRANSFER_SYNTAXES
from pipelines.tasks import Code, TaskSpec

#: Image SOP Classes whose IOD has no Multi-frame Module (US Image, PS3.3 A.6; SC Image, A.8.1;
#: CT, MR, CR). Some scanners still put several frames in them (pydicom-data's OBXXXX1A_2frame);
#: a Referenced Frame Number into such an instance is not allowed (PS3.3 Table 10-3).
SINGLE_FRAME_CLASSES = frozenset(
    {
        UltrasoundImageStorage,
        "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (retired)
        SecondaryCaptureImageStorage,
        CTImageStorage,
        MRImageStorage,
        ComputedRadiographyImageStorage,
    }
)

#: Manufacturer (0008,0070) of every object usfmd writes; the receive side's loop guard keys on it.
USFMD_MANUFACTURER = "usfmd"

#: PS3.5 §9.1: components without leading zeros, at most 64 characters.
_UID = re.compile(r"^(?=.{1,64}$)(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_SOURCE_UID = re.compile(r"^(?=.{1,64}$)[0-9]+(\.[0-9]+)*$")
_PARAMETER_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
#: Frames whose per-class probabilities are not combined sum to 1 (softmax, or sigmoid + 1 − p).
_SUM_TOLERANCE = 1e-3
_MATCH_TOLERANCE = 1e-6


def check_uid(field_name: str, value: object) -> str:
    """``value`` is a valid UID (PS3.5 §9.1: digits and dots, ≤ 64 characters, no leading zeros)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field_name} must be a non-empty UID string, got {value!r}")
    if not _UID.match(value):
        raise ValueError(f"{field_name} {value!r} is not a valid DICOM UID (PS3.5 §9.1)")
    return value


def check_source_uid(field_name: str, value: object) -> str:
    """A UID as found in a source file: PS3.5 §9.1's characters and length.

    Laxer than :func:`check_uid`: scanners do write components with leading zeros, and a result
    must still reference the instance by the UID it really has.
    """
    if not isinstance(value, str) or not _SOURCE_UID.match(value):
        raise ValueError(
            f"{field_name} {value!r} is not a UID: 1 to 64 digits and dots expected (PS3.5 §9.1)"
        )
    return value


def check_long_string(field_name: str, value: object) -> str:
    """``value`` fits LO (PS3.5 Table 6.2-1: ≤ 64 characters, no backslash) in printable ASCII.

    ASCII because these strings are also burned into heatmaps with OpenCV's Hershey fonts, which
    draw nothing else, and because the default character repertoire needs no Specific Character Set.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field_name} must be a non-empty string, got {value!r}")
    if len(value) > 64:
        raise ValueError(f"{field_name} {value!r} is longer than 64 characters (LO, PS3.5 6.2)")
    if "\\" in value or not (value.isascii() and value.isprintable()):
        raise ValueError(
            f"{field_name} {value!r} must be printable ASCII without backslash (LO, PS3.5 6.2)"
        )
    return value


def _check_probability(field_name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{field_name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ValueError(f"{field_name} must be a probability in [0, 1], got {value!r}")
    return number


def _strip_pixels(header: Dataset) -> Dataset:
    """A copy of the top-level attributes before Pixel Data, without overlay planes.

    Keeps what the results copy (patient, study, series, equipment) and drops what they never
    need (pixels: megabytes per cine), so a finding can be held for a whole study.
    """
    stripped = Dataset()
    for element in header:
        group = element.tag.group
        if element.tag >= 0x7FE00000 or 0x6000 <= group <= 0x60FF:
            continue
        stripped.add(element)
    syntax = getattr(header, "file_meta", Dataset()).get("TransferSyntaxUID")
    if syntax is not None:  # whether the source was lossy-compressed (PS3.3 C.7.6.1.1.5)
        stripped.file_meta = FileMetaDataset()
        stripped.file_meta.TransferSyntaxUID = syntax
    return copy.deepcopy(stripped)


@dataclass(frozen=True, slots=True)
class SourceImage:
    """A reference to the analysed image instance, with its header for the results to copy.

    ``frame_number`` (1-based, PS3.3 Table 10-3 Referenced Frame Number) is set when only that
    frame of a multi-frame image was analysed; ``None`` means the whole instance (a single-frame
    image, or a cine whose frames were aggregated — the finding then names its best frame).
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    #: The source's attributes (pixel data is dropped on construction).
    header: Dataset = field(repr=False, compare=False)
    frame_number: int | None = None

    def __post_init__(self) -> None:
        check_source_uid("sop_class_uid", self.sop_class_uid)
        check_source_uid("sop_instance_uid", self.sop_instance_uid)
        check_source_uid("study_instance_uid", self.study_instance_uid)
        check_source_uid("series_instance_uid", self.series_instance_uid)
        if not isinstance(self.header, Dataset):
            raise ValueError(f"header must be a pydicom Dataset, got {type(self.header).__name__}")
        for name, keyword in (
            ("sop_class_uid", "SOPClassUID"),
            ("sop_instance_uid", "SOPInstanceUID"),
            ("study_instance_uid", "StudyInstanceUID"),
            ("series_instance_uid", "SeriesInstanceUID"),
        ):
            found = self.header.get(keyword)
            if found is None or str(found) != getattr(self, name):
                raise ValueError(
                    f"{name} {getattr(self, name)!r} does not match the header's "
                    f"{keyword} {found!r} (SOP Instance {self.sop_instance_uid})"
                )
        if "Rows" not in self.header or "Columns" not in self.header:
            raise ValueError(
                f"header of SOP Instance {self.sop_instance_uid} has no Rows/Columns: "
                "results are built on images only (not SR, KOS or presentation states)"
            )
        if str(self.header.get("Manufacturer", "")).strip() == USFMD_MANUFACTURER:
            raise ValueError(
                f"SOP Instance {self.sop_instance_uid} was written by usfmd (Manufacturer "
                f"{USFMD_MANUFACTURER!r}); results are never built on our own outputs"
            )
        frames = self.number_of_frames
        if self.frame_number is not None:
            if isinstance(self.frame_number, bool) or not isinstance(self.frame_number, int):
                raise ValueError(f"frame_number must be an int or None, got {self.frame_number!r}")
            if frames == 1:
                raise ValueError(
                    f"frame_number {self.frame_number} given for single-frame SOP Instance "
                    f"{self.sop_instance_uid}: Referenced Frame Number applies to multi-frame "
                    "images only (PS3.3 Table 10-3); use None"
                )
            if not 1 <= self.frame_number <= frames:
                raise ValueError(
                    f"frame_number {self.frame_number} outside 1..{frames} of SOP Instance "
                    f"{self.sop_instance_uid}"
                )
        object.__setattr__(self, "header", _strip_pixels(self.header))

    @classmethod
    def from_dataset(cls, dataset: Dataset, frame_number: int | None = None) -> SourceImage:
        """The reference to ``dataset`` (a full instance or a header read without pixels)."""
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if keyword not in dataset:
                raise ValueError(f"source dataset has no {keyword}")
        return cls(
            sop_class_uid=str(dataset.SOPClassUID),
            sop_instance_uid=str(dataset.SOPInstanceUID),
            study_instance_uid=str(dataset.StudyInstanceUID),
            series_instance_uid=str(dataset.SeriesInstanceUID),
            header=dataset,
            frame_number=frame_number,
        )

    @property
    def number_of_frames(self) -> int:
        value = self.header.get("NumberOfFrames")
        try:
            frames = int(value) if value not in (None, "") else 1
        except (TypeError, ValueError):
            raise ValueError(
                f"Number of Frames {value!r} of SOP Instance {self.sop_instance_uid} is not an "
                "integer"
            ) from None
        if frames < 1:
            raise ValueError(
                f"Number of Frames {frames} of SOP Instance {self.sop_instance_uid} is below 1"
            )
        return frames

    @property
    def is_multiframe(self) -> bool:
        return self.number_of_frames > 1

    def frame_reference(self, frame_number: int | None) -> list[int] | None:
        """Referenced Frame Number (0008,1160) for ``frame_number``, or ``None`` where the
        standard forbids one (single-frame images and SOP Classes without frames)."""
        if frame_number is None or self.sop_class_uid in SINGLE_FRAME_CLASSES:
            return None
        return [frame_number]

    @property
    def lossy(self) -> bool:
        """The pixels have been through lossy compression (PS3.3 C.7.6.1.1.5), so has any image
        derived from them."""
        if str(self.header.get("LossyImageCompression", "")) == "01":
            return True
        syntax = getattr(self.header, "file_meta", Dataset()).get("TransferSyntaxUID")
        return syntax in LOSSY_TRANSFER_SYNTAXES

    @property
    def rows(self) -> int:
        return int(self.header.Rows)

    @property
    def columns(self) -> int:
        return int(self.header.Columns)


@dataclass(frozen=True, slots=True)
class ImageFinding:
    """What a model decided about one source image.

    ``class_probabilities`` holds every class of the task; ``probability`` is that of the reported
    ``class_name`` (not necessarily the arg-max: a site may set a decision threshold). For a cine
    analysed as a whole, ``aggregation`` says how per-frame probabilities were combined (e.g.
    ``"mean"``, ``"max"``, ``"top3-mean"``) and ``best_frame`` (1-based) is the frame that shows
    the finding best — the one the heatmap is drawn on.
    """

    source: SourceImage
    task: TaskSpec
    class_name: str
    probability: float
    class_probabilities: Mapping[str, float] = field(hash=False)
    best_frame: int | None = None
    aggregation: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, SourceImage):
            raise ValueError(f"source must be a SourceImage, got {type(self.source).__name__}")
        if not isinstance(self.task, TaskSpec):
            raise ValueError(f"task must be a TaskSpec, got {type(self.task).__name__}")
        names = self.task.class_names
        if self.class_name not in names:
            raise ValueError(
                f"class_name {self.class_name!r} is not a class of task {self.task.name!r}: "
                f"expected one of {list(names)}"
            )
        self._check_frames()
        probability = _check_probability("probability", self.probability)
        if not isinstance(self.class_probabilities, Mapping):
            raise ValueError("class_probabilities must be a mapping of class name to probability")
        missing = [n for n in names if n not in self.class_probabilities]
        extra = [n for n in self.class_probabilities if n not in names]
        if missing or extra:
            raise ValueError(
                f"class_probabilities of task {self.task.name!r} must have exactly the classes "
                f"{list(names)}: missing {missing}, unexpected {extra}"
            )
        ordered = {
            n: _check_probability(f"class_probabilities[{n!r}]", self.class_probabilities[n])
            for n in names
        }
        if abs(ordered[self.class_name] - probability) > _MATCH_TOLERANCE:
            raise ValueError(
                f"probability {probability} differs from class_probabilities[{self.class_name!r}]"
                f" = {ordered[self.class_name]}"
            )
        if self.aggregation is None and abs(sum(ordered.values()) - 1.0) > _SUM_TOLERANCE:
            raise ValueError(
                f"class_probabilities of one frame must sum to 1 (softmax or sigmoid), got "
                f"{sum(ordered.values()):.6f}"
            )
        object.__setattr__(self, "probability", probability)
        object.__setattr__(self, "class_probabilities", MappingProxyType(ordered))

    def _check_frames(self) -> None:
        source = self.source
        uid = source.sop_instance_uid
        if self.best_frame is not None and (
            isinstance(self.best_frame, bool) or not isinstance(self.best_frame, int)
        ):
            raise ValueError(f"best_frame must be an int or None, got {self.best_frame!r}")
        if self.aggregation is not None:
            check_long_string("aggregation", self.aggregation)
        if not source.is_multiframe:
            if self.best_frame is not None or self.aggregation is not None:
                raise ValueError(
                    f"single-frame SOP Instance {uid}: best_frame and aggregation must be None"
                )
        elif source.frame_number is not None:
            if self.aggregation is not None:
                raise ValueError(
                    f"SOP Instance {uid}: a result of frame {source.frame_number} alone has no "
                    f"aggregation (got {self.aggregation!r}); reference the whole instance"
                )
            if self.best_frame not in (None, source.frame_number):
                raise ValueError(
                    f"best_frame {self.best_frame} differs from the analysed frame "
                    f"{source.frame_number} of SOP Instance {uid}"
                )
        else:
            if self.aggregation is None:
                raise ValueError(
                    f"multi-frame SOP Instance {uid} analysed as a whole needs the aggregation "
                    "used over its frames (e.g. 'mean'), or a source frame_number"
                )
            if self.best_frame is None or not 1 <= self.best_frame <= source.number_of_frames:
                raise ValueError(
                    f"best_frame {self.best_frame!r} of multi-frame SOP Instance {uid} must be "
                    f"in 1..{source.number_of_frames}"
                )

    @property
    def reported_frame(self) -> int | None:
        """1-based frame the result is shown on; ``None`` for a single-frame image."""
        return self.source.frame_number if self.source.frame_number is not None else self.best_frame

    @property
    def code(self) -> Code:
        """Coded concept of the reported class."""
        return self.task.classes[self.task.index(self.class_name)].code


@dataclass(frozen=True, slots=True)
class Algorithm:
    """The model version that produced the findings (TID 4019 and Contributing Equipment).

    ``device_uid`` identifies this model *version* (DESIGN.md §4): a retrained model is another
    device. A model trained on synthetic phantoms must say so in its name, so that every PACS
    user who reads its output sees it; ``synthetic`` and the name must agree.
    """

    name: str
    version: str
    manufacturer: str
    device_uid: str
    parameters: Mapping[str, str | int | float | bool] = field(default_factory=dict, hash=False)
    synthetic: bool = False

    def __post_init__(self) -> None:
        check_long_string("name", self.name)
        check_long_string("version", self.version)
        check_long_string("manufacturer", self.manufacturer)
        check_uid("device_uid", self.device_uid)
        if not isinstance(self.synthetic, bool):
            raise ValueError(f"synthetic must be a bool, got {self.synthetic!r}")
        says_synthetic = "synthetic" in self.name.lower()
        if self.synthetic and not says_synthetic:
            raise ValueError(
                f"name {self.name!r} of a model trained on synthetic data must contain 'synthetic'"
            )
        if says_synthetic and not self.synthetic:
            raise ValueError(
                f"name {self.name!r} says synthetic but synthetic=False: set synthetic=True "
                "so its results are marked as a synthetic demo model"
            )
        if not isinstance(self.parameters, Mapping):
            raise ValueError("parameters must be a mapping of name to value")
        for key, value in self.parameters.items():
            if not isinstance(key, str) or not _PARAMETER_KEY.match(key):
                raise ValueError(
                    f"parameter name {key!r} must be a letter followed by up to 63 letters, "
                    "digits, '_', '.' or '-'"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"parameter {key!r} must be finite, got {value!r}")
            if not isinstance(value, str | int | float | bool):
                raise ValueError(
                    f"parameter {key!r} must be a str, int, float or bool, got "
                    f"{type(value).__name__}"
                )
            if isinstance(value, str) and not value.isprintable():
                raise ValueError(f"parameter {key!r} must be printable text")
        object.__setattr__(
            self, "parameters", MappingProxyType(dict(sorted(self.parameters.items())))
        )

    def parameter_strings(self, **extra: str | int | float | bool) -> list[str]:
        """``name=value`` strings for TID 4019 Algorithm Parameters, sorted by name."""
        merged = {**self.parameters, **extra}
        return [f"{key}={_format(merged[key])}" for key in sorted(merged)]


def _format(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
