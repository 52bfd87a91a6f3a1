"""Which tasks run on which image: routing rules on DICOM attributes and on earlier results.

As in mercure, a rule matches header attributes (shell-style patterns, case-insensitive); unlike
a plain tag router, a rule may also require another task's result, e.g. run ``ventriculomegaly``
only where a plane classifier said ``transventricular``. Rules are validated when the
configuration loads: unknown or circular requirements are refused with the rule named. With no
rules configured, every registered task runs on every analysable image; a task without an active
model then leaves the image awaiting that model, never a made-up result.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydicom.dataset import Dataset

from pipelines.tasks import Code, TaskClass, TaskSpec


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Requirement(_Section):
    """Run only where ``task`` reported one of ``classes``."""

    task: str
    classes: tuple[str, ...] = Field(min_length=1)


class Route(_Section):
    task: str
    #: DICOM keyword → pattern or patterns (any may match); every keyword must match.
    match: dict[str, str | tuple[str, ...]] = {}
    requires: Requirement | None = None

    @field_validator("match")
    @classmethod
    def _keywords_exist(cls, value: dict[str, str | tuple[str, ...]]) -> dict[str, object]:
        from pydicom.datadict import tag_for_keyword

        unknown = [k for k in value if tag_for_keyword(k) is None]
        if unknown:
            raise ValueError(f"not DICOM keywords: {', '.join(unknown)} (e.g. 'Modality')")
        return dict(value)


class CodeSetting(_Section):
    value: str
    scheme: str
    meaning: str

    def to_code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class ClassSetting(CodeSetting):
    name: str


class TaskSetting(_Section):
    """A site-defined task, registered beside the built-in ones."""

    name: str
    title: str
    finding: CodeSetting
    classes: tuple[ClassSetting, ...]
    head: Literal["softmax", "sigmoid"] = "softmax"
    normal_class: str | None = None

    def to_spec(self) -> TaskSpec:
        members = tuple(TaskClass(c.name, c.to_code()) for c in self.classes)
        return TaskSpec(
            self.name, self.title, self.finding.to_code(), members, self.head, self.normal_class
        )

    @model_validator(mode="after")
    def _valid_spec(self) -> TaskSetting:
        self.to_spec()  # TaskSpec and Code validate names, codes and heads
        return self


class AnalysisSettings(_Section):
    """``[analysis]``: routing, batching and how a cine's frames become one result."""

    routes: tuple[Route, ...] = ()
    tasks: tuple[TaskSetting, ...] = ()
    #: How a cine's per-frame probabilities become the instance result.
    aggregate: Literal["mean", "max", "topk"] = "mean"
    top_k: int = Field(default=5, ge=1)
    #: Most frames per forward pass, from all the jobs of a worker process; None: what the
    #: device runs best (``Predictor.preferred_batch``: 16 on CPU, 64 on CUDA).
    max_batch: int | None = Field(default=None, ge=1, le=1024)
    #: Longest a frame waits for others to join its batch.
    max_wait_ms: float = Field(default=20, ge=0, le=10_000)
    #: Analyse every n-th frame of a cine (1: all frames).
    frame_stride: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _requirements_resolve(self) -> AnalysisSettings:
        order(self.routes)  # raises on unknown or circular requirements
        return self


@dataclass(frozen=True, slots=True)
class Decision:
    """Tasks to run now, and tasks that wait for another task's result."""

    run: tuple[str, ...]
    deferred: tuple[str, ...]


def order(routes: Sequence[Route]) -> tuple[Route, ...]:
    """Routes in an order where every requirement's task comes first (stable otherwise)."""
    routed = {r.task for r in routes}
    for r in routes:
        if r.requires is not None and r.requires.task not in routed:
            raise ValueError(
                f"route for task {r.task!r} requires task {r.requires.task!r}, which no route runs"
            )
    done: list[Route] = []
    placed: set[str] = set()
    pending = list(routes)
    while pending:
        ready = [r for r in pending if r.requires is None or r.requires.task in placed]
        if not ready:
            cycle = ", ".join(sorted({r.task for r in pending}))
            raise ValueError(f"routes have circular requirements among: {cycle}")
        for r in ready:
            done.append(r)
            pending.remove(r)
        placed |= {r.task for r in ready}
    return tuple(done)


def attributes_match(match: Mapping[str, str | tuple[str, ...]], header: Dataset) -> bool:
    """Every keyword present and one of its patterns matching (shell-style, case-insensitive).

    A multi-valued attribute (e.g. ImageType) matches when any value matches.
    """
    for keyword, patterns in match.items():
        value = header.get(keyword)
        if value is None or value == "":
            return False
        values = [str(v) for v in value] if _is_multi(value) else [str(value)]
        wanted = (patterns,) if isinstance(patterns, str) else patterns
        if not any(fnmatch.fnmatchcase(v.upper(), p.upper()) for v in values for p in wanted):
            return False
    return True


def _is_multi(value: object) -> bool:
    return isinstance(value, Iterable) and not isinstance(value, str | bytes)


def decide(
    routes: Sequence[Route],
    header: Dataset,
    results: Mapping[str, str],
    all_tasks: Sequence[str],
) -> Decision:
    """Which tasks apply to an image with this header, given results known so far.

    ``results`` maps task → reported class for this image. A route whose requirement's task has
    no result yet is deferred; one whose requirement reported another class does not apply.
    """
    if not routes:
        return Decision(run=tuple(t for t in all_tasks if t not in results), deferred=())
    run: list[str] = []
    deferred: list[str] = []
    for r in order(routes):
        if r.task in results or r.task in run or not attributes_match(r.match, header):
            continue
        if r.requires is None:
            run.append(r.task)
        elif r.requires.task not in results:
            deferred.append(r.task)
        elif results[r.requires.task] in r.requires.classes:
            run.append(r.task)
    return Decision(run=tuple(run), deferred=tuple(t for t in deferred if t not in run))


def check_routes(routes: Sequence[Route], tasks: Mapping[str, TaskSpec]) -> None:
    """Refuse routes naming unknown tasks or classes (run once the task registry is complete)."""
    for r in routes:
        if r.task not in tasks:
            raise ValueError(f"route names unknown task {r.task!r}; known: {sorted(tasks)}")
        if r.requires is not None:
            known = tasks[r.requires.task].class_names if r.requires.task in tasks else ()
            missing = [c for c in r.requires.classes if c not in known]
            if missing:
                raise ValueError(
                    f"route for {r.task!r} requires classes {missing} that task "
                    f"{r.requires.task!r} does not have (it has {list(known)})"
                )
