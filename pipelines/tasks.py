"""The task registry: what each analysis task decides, and the coded concepts its results carry.

A task names its classes in the order of the model's outputs and gives each a coded concept, so that
a result is the same thing in the database, in the TID 1500 SR (PS3.16 TID 1500 qualitative
evaluation) and on the review worklist. Codes without a standard equivalent use the private coding
scheme :data:`USFMD_SCHEME` (PS3.16 §8.2: "99" prefix), which every SR we write declares in its
Coding Scheme Identification Sequence. Sites add tasks through configuration (``register_task``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

#: Private coding scheme designator for usfmd's own concepts (PS3.16 §8.2, "99" + owner).
USFMD_SCHEME = "99USFMD"
#: Name and version of that scheme, for the SR's Coding Scheme Identification Sequence.
USFMD_SCHEME_NAME = "usfmd local codes"
USFMD_SCHEME_VERSION = "1"

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass(frozen=True, slots=True)
class Code:
    """A coded concept: (value, scheme designator, meaning), as PS3.3 §8.8 defines it."""

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        # PS3.5 Table 6.2-1: Code Value is SH (≤ 16), Code Meaning LO (≤ 64).
        if not self.value or len(self.value) > 16:
            raise ValueError(f"code value {self.value!r} must have 1 to 16 characters")
        if not self.scheme or len(self.scheme) > 16:
            raise ValueError(f"coding scheme {self.scheme!r} must have 1 to 16 characters")
        if not self.meaning or len(self.meaning) > 64:
            raise ValueError(f"code meaning {self.meaning!r} must have 1 to 64 characters")


def local(value: str, meaning: str) -> Code:
    return Code(value, USFMD_SCHEME, meaning)


@dataclass(frozen=True, slots=True)
class TaskClass:
    name: str
    code: Code


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task: its classes in model-output order and how its head turns logits into them.

    ``head`` is ``softmax`` (one logit per class) or ``sigmoid`` (one logit: the probability of the
    *last* class, e.g. ``adequate``; the first class gets 1 − p).
    """

    name: str
    title: str
    finding: Code
    classes: tuple[TaskClass, ...]
    head: Literal["softmax", "sigmoid"] = "softmax"
    #: The class that means "nothing to flag"; the worklist and the SC overlay use it.
    normal_class: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(
                f"task name {self.name!r} must be lower-case letters, digits and '_', "
                "starting with a letter"
            )
        names = [c.name for c in self.classes]
        if len(names) < 2:
            raise ValueError(f"task {self.name!r} needs at least two classes, got {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"task {self.name!r} repeats a class name: {names}")
        if self.head == "sigmoid" and len(names) != 2:
            raise ValueError(f"task {self.name!r}: a sigmoid head needs exactly two classes")
        if self.normal_class is not None and self.normal_class not in names:
            raise ValueError(
                f"task {self.name!r}: normal class {self.normal_class!r} not in {names}"
            )

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def num_outputs(self) -> int:
        """Logits the model head must produce."""
        return 1 if self.head == "sigmoid" else len(self.classes)

    def index(self, class_name: str) -> int:
        try:
            return self.class_names.index(class_name)
        except ValueError:
            raise KeyError(f"task {self.name!r} has no class {class_name!r}") from None


def _task(name: str, title: str, finding: Code, classes: dict[str, Code], **kw: object) -> TaskSpec:
    members = tuple(TaskClass(n, c) for n, c in classes.items())
    return TaskSpec(name, title, finding, members, **kw)  # type: ignore[arg-type]


#: SNOMED CT 17621005 "Normal" (a qualifier value, as used in PS3.16 CID 244 and others).
NORMAL = Code("17621005", "SCT", "Normal")

BUILTIN_TASKS: tuple[TaskSpec, ...] = (
    _task(
        "heart_view",
        "First-trimester fetal heart view",
        local("HV-VIEW", "First-trimester fetal heart view"),
        {
            "aorta": local("HV-AORTA", "Aorta view"),
            "atrioventricular_flows": local("HV-AVFLOW", "Atrioventricular flows view"),
            "v_sign": local("HV-VSIGN", "V sign view"),
            "x_sign": local("HV-XSIGN", "X sign view"),
            "other": local("HV-OTHER", "Other view"),
        },
    ),
    _task(
        "ventriculomegaly",
        "Fetal ventriculomegaly (transventricular plane)",
        local("VM-FINDING", "Fetal cerebral ventricular size"),
        {
            "normal": NORMAL,
            "ventriculomegaly": local("VM-VM", "Ventriculomegaly (atrium >= 10 mm)"),
        },
        normal_class="normal",
    ),
    _task(
        "image_quality",
        "Blind-sweep frame quality (abdominal plane)",
        local("IQ-QUALITY", "Frame adequacy for abdominal measurement"),
        {
            "inadequate": local("IQ-INADEQ", "Inadequate frame"),
            "adequate": local("IQ-ADEQ", "Adequate frame"),
        },
        head="sigmoid",
        normal_class="adequate",
    ),
)

_REGISTRY: dict[str, TaskSpec] = {t.name: t for t in BUILTIN_TASKS}


def register_task(spec: TaskSpec, *, replace: bool = False) -> None:
    """Add a task (from configuration); refuses to silently redefine an existing one."""
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] != spec:
        raise ValueError(f"task {spec.name!r} is already registered with a different definition")
    _REGISTRY[spec.name] = spec


def get_task(name: str) -> TaskSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown task {name!r}; known tasks: {known}") from None


def list_tasks() -> tuple[TaskSpec, ...]:
    return tuple(_REGISTRY[n] for n in sorted(_REGISTRY))
