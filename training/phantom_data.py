"""Labelled phantom frames for a task, prepared exactly as the daemon prepares real frames.

Each phantom stands for one patient: its seed draws the anatomy, the speckle, the invented patient
and the overlay, so a split is a set of seeds, and the three splits use disjoint seed ranges — the
patient-level split the papers use (DESIGN.md §3). Every frame goes the daemon's way: the phantom
becomes a DICOM instance in memory, :func:`pipelines.clean.clean_instance` decodes, scrubs and
inpaints it, and :func:`pipelines.preprocess.preprocess` makes the model input with the model's
own :class:`~pipelines.preprocess.PreprocessSpec`. The prepared tensors are kept in memory, so an
epoch costs only the model's time; augmentations (:mod:`training.augment`) work on those tensors.

Only tasks whose ground truth the phantom draws can be built: ``heart_view`` (the five views of
:data:`~pipelines.phantom.HEART_VIEWS`) and ``ventriculomegaly`` (atrial width against the 10 mm
cut-off). Anything else raises :class:`PhantomTaskError`.
"""

from __future__ import annotations

import copyreg
import dataclasses
import multiprocessing
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
import torch
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
from torch.utils.data import Dataset

from pipelines.clean import CleanParams, clean_instance
from pipelines.phantom import (
    HEART_VIEWS,
    VENTRICULOMEGALY_MM,
    PhantomParams,
    PhantomSample,
    make_phantom,
)
from pipelines.phantom.dicom import phantom_dataset
from pipelines.phantom.params import AnnotationStyle
from pipelines.preprocess import PreprocessSpec, preprocess
from pipelines.scrub import ScrubParams
from pipelines.tasks import TaskSpec, get_task

SplitName = Literal["train", "val", "test"]
SPLITS: tuple[SplitName, ...] = ("train", "val", "test")
#: Seeds of split ``k`` are ``seed * 3 * SPLIT_STRIDE + k * SPLIT_STRIDE + index``: disjoint
#: ranges, and a split's phantoms do not change when another split's size does.
SPLIT_STRIDE = 1_000_000
Encoding = Literal["native", "jpeg"]
_SYNTAX: Mapping[Encoding, str] = {"native": ExplicitVRLittleEndian, "jpeg": JPEGBaseline8Bit}


class PhantomTaskError(ValueError):
    """The phantom cannot label this task (it draws no ground truth for it)."""


@dataclass(frozen=True, slots=True)
class PhantomTask:
    """A task the phantom labels, and the scene (head or heart) that carries its ground truth."""

    task: str
    kind: Literal["head", "heart"]


#: The tasks phantoms carry ground truth for.
PHANTOM_TASKS: Mapping[str, PhantomTask] = {
    "heart_view": PhantomTask("heart_view", "heart"),
    "ventriculomegaly": PhantomTask("ventriculomegaly", "head"),
}


def phantom_task(task: str) -> PhantomTask:
    """The phantom's labelling of ``task``; :class:`PhantomTaskError` if it has none."""
    try:
        return PHANTOM_TASKS[task]
    except KeyError:
        raise PhantomTaskError(
            f"phantoms carry no ground truth for task {task!r}; they can label "
            f"{sorted(PHANTOM_TASKS)}"
        ) from None


def demo_phantom_params(width: int = 400, height: int = 300) -> PhantomParams:
    """Default phantom geometry scaled down to a ``width`` x ``height`` frame.

    The sector and the anatomy shrink with the frame (pixel spacings grow by the same factor),
    so after the squash to the model's square input a small phantom looks like a full-size one;
    the burned-in text keeps its pixel size, as a scanner's does. Small frames are cheaper to
    draw and clean (400 x 300: ~4x), which is what lets a demo model train in minutes.
    """
    base = PhantomParams()
    scale = min(width / base.width, height / base.height)
    half = np.radians(base.fan.half_angle_deg)
    top = max(round(base.fan.top * scale), base.annotation.phi_band_height + 4)
    inner = max(round(base.fan.inner_radius * scale), 8)
    apex_y = top - inner * float(np.cos(half))
    outer = min(
        round(base.fan.outer_radius * scale),
        int(height - 2 - apex_y),
        int((width - 21) / (2 * float(np.sin(half)))),
    )
    fit = outer / base.fan.outer_radius
    return dataclasses.replace(
        base,
        width=width,
        height=height,
        fan=dataclasses.replace(base.fan, top=top, inner_radius=inner, outer_radius=outer),
        head=dataclasses.replace(base.head, mm_per_pixel=base.head.mm_per_pixel / fit),
        heart=dataclasses.replace(base.heart, mm_per_pixel=base.heart.mm_per_pixel / fit),
    )


@dataclass(frozen=True, slots=True)
class PhantomDataSpec:
    """What to draw: the task, split sizes, seeds, geometry and how frames reach the model.

    Attributes
    ----------
    task
        ``heart_view`` or ``ventriculomegaly`` (:data:`PHANTOM_TASKS`).
    train, val, test
        Phantoms (patients, one frame each) per split; classes are balanced by cycling.
    seed
        Shifts every split's seed range; one ``seed`` always gives the same pixels.
    params
        Phantom geometry (:func:`demo_phantom_params` for small, fast frames).
    vm_margin_mm
        ventriculomegaly only: atrial widths are drawn at least this far from the 10 mm cut-off
        (0: anywhere in the phantom's range). A demo may keep the hard borderline cases out;
        the model's metadata records it.
    styles
        Overlay styles, cycled over the phantoms, so inpainting sees coloured, grey and no
        calipers as it would on a real site.
    encoding
        How the phantom's DICOM instance stores pixels before decode: ``native`` RGB or ``jpeg``
        (JPEG Baseline, YBR_FULL_422, as most scanners send).
    clean
        The clean stage's settings: must equal the daemon's ``[pipeline]`` section (the model
        file records them).
    """

    task: str
    train: int
    val: int
    test: int
    seed: int = 0
    params: PhantomParams = field(default_factory=PhantomParams)
    vm_margin_mm: float = 0.0
    styles: tuple[AnnotationStyle, ...] = ("colour", "grey", "none")
    encoding: Encoding = "native"
    clean: CleanParams = field(default_factory=CleanParams)

    def __post_init__(self) -> None:
        phantom_task(self.task)
        for name in SPLITS:
            count = getattr(self, name)
            if not 0 <= count < SPLIT_STRIDE:
                raise ValueError(f"{name}={count}: expected 0..{SPLIT_STRIDE - 1} phantoms")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed}: expected ≥ 0")
        lo, hi = self.params.head.atrial_width_range_mm
        if not 0.0 <= self.vm_margin_mm < min(VENTRICULOMEGALY_MM - lo, hi - VENTRICULOMEGALY_MM):
            raise ValueError(
                f"vm_margin_mm={self.vm_margin_mm}: expected ≥ 0 and leaving room on both sides "
                f"of {VENTRICULOMEGALY_MM} mm within the atrial width range {lo}..{hi} mm"
            )
        if not self.styles:
            raise ValueError("styles: expected at least one overlay style")
        if self.encoding not in _SYNTAX:
            raise ValueError(f"encoding={self.encoding!r}: expected one of {sorted(_SYNTAX)}")

    def size(self, split: SplitName) -> int:
        return int(getattr(self, split))

    def seeds(self, split: SplitName) -> range:
        """The phantom seeds of ``split`` (disjoint from the other splits')."""
        start = self.seed * len(SPLITS) * SPLIT_STRIDE + SPLITS.index(split) * SPLIT_STRIDE
        return range(start, start + self.size(split))

    def describe(self) -> dict[str, Any]:
        """JSON record for a model file's metadata: enough to rebuild the same data."""
        p = self.params
        return {
            "task": self.task,
            "sizes": {name: self.size(name) for name in SPLITS},
            "seed": self.seed,
            "seed_ranges": {
                name: [self.seeds(name).start, self.seeds(name).stop] for name in SPLITS
            },
            "frame": {"width": p.width, "height": p.height},
            "phantom_params": _plain(p),
            "vm_margin_mm": self.vm_margin_mm,
            "styles": list(self.styles),
            "encoding": self.encoding,
            "clean": clean_record(self.clean),
        }


def clean_record(params: CleanParams) -> dict[str, Any]:
    """The clean stage's settings as JSON (what the daemon's ``[pipeline]`` must match)."""
    scrub = _fields(params.scrub)
    scrub["strips"] = [
        {"manufacturer": m, "model": mod, "rows": rows}
        for (m, mod), rows in params.scrub.strips.items()
    ]
    return _plain(
        {"scrub": scrub, "inpaint": _fields(params.inpaint), "detect_band": params.detect_band}
    )


def _fields(instance: Any) -> dict[str, Any]:
    """A dataclass's fields, shallow (``dataclasses.asdict`` deep-copies, which read-only
    mappings refuse)."""
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(_fields(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def phantom_label(
    task: TaskSpec, spec: PhantomDataSpec, seed: int, index: int
) -> tuple[int, dict[str, Any]]:
    """Class index (balanced by cycling ``index``) and the phantom arguments that draw it."""
    classes = task.class_names
    label = index % len(classes)
    if task.name == "heart_view":
        view = classes[label]
        if view not in HEART_VIEWS:  # pragma: no cover - the task registry and phantom agree
            raise PhantomTaskError(f"heart view {view!r} is not one the phantom draws")
        return label, {"heart_view": view}
    # ventriculomegaly: the width is drawn here, on the class's side of the cut-off.
    lo, hi = spec.params.head.atrial_width_range_mm
    rng = np.random.default_rng([seed, 0x5EED])
    if classes[label] == "ventriculomegaly":
        width = rng.uniform(VENTRICULOMEGALY_MM + spec.vm_margin_mm, hi)
    else:
        width = rng.uniform(lo, VENTRICULOMEGALY_MM - spec.vm_margin_mm)
    return label, {"atrial_width_mm": float(width)}


def draw_phantom(spec: PhantomDataSpec, split: SplitName, index: int) -> tuple[PhantomSample, int]:
    """Phantom ``index`` of ``split`` and its class index (in the task's class order)."""
    task = get_task(spec.task)
    seed = spec.seeds(split)[index]
    label, kwargs = phantom_label(task, spec, seed, index)
    sample = make_phantom(
        seed,
        phantom_task(spec.task).kind,
        spec.params,
        style=spec.styles[index % len(spec.styles)],
        **kwargs,
    )
    truth = _truth_index(task, sample)
    if truth != label:  # pragma: no cover - would mean the phantom drew something else
        raise PhantomTaskError(f"phantom seed {seed} drew class {truth}, asked for {label}")
    return sample, label


def _truth_index(task: TaskSpec, sample: PhantomSample) -> int:
    """The class of a phantom from its own ground truth (not from what was asked)."""
    labels = sample.labels
    if task.name == "heart_view" and labels.heart_view is not None:
        return task.index(labels.heart_view)
    if task.name == "ventriculomegaly" and labels.ventriculomegaly is not None:
        return task.index("ventriculomegaly" if labels.ventriculomegaly else "normal")
    raise PhantomTaskError(f"a {labels.kind} phantom has no {task.name!r} label")


def prepare_frame(
    sample: PhantomSample, preprocessing: PreprocessSpec, spec: PhantomDataSpec
) -> np.ndarray:
    """The model input the daemon would make of this phantom's DICOM instance.

    The phantom becomes a DICOM instance (its UIDs derive from the seed), which
    :func:`pipelines.clean.clean_instance` decodes, scrubs and inpaints — the ``analyze`` job's
    own path — and :func:`pipelines.preprocess.preprocess` turns into ``(3, S, S)`` float32.
    """
    dataset = phantom_dataset([sample], transfer_syntax=_SYNTAX[spec.encoding])
    frames = list(clean_instance(dataset, spec.clean))
    if len(frames) != 1:  # pragma: no cover - a single-frame instance
        raise PhantomTaskError(f"phantom seed {sample.seed} decoded to {len(frames)} frames")
    return preprocess(frames[0].pixels, preprocessing)


class PhantomSplit(Dataset[tuple[torch.Tensor, int]]):
    """One split in memory: ``(N, 3, S, S)`` float32 inputs, ``(N,)`` int64 class indices.

    A :class:`torch.utils.data.Dataset` of ``(image, label)`` pairs, so the fine-tuning loop takes
    it as it would take real data.
    """

    def __init__(
        self,
        name: SplitName,
        images: torch.Tensor,
        labels: torch.Tensor,
        seeds: Sequence[int],
        class_names: Sequence[str],
    ) -> None:
        if images.ndim != 4 or images.shape[0] != labels.shape[0] or labels.ndim != 1:
            raise ValueError(
                f"images {tuple(images.shape)} and labels {tuple(labels.shape)}: "
                "expected (N, 3, S, S) and (N,)"
            )
        self.name = name
        self.images = images
        self.labels = labels
        self.seeds = tuple(seeds)
        self.class_names = tuple(class_names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def class_counts(self) -> list[int]:
        return [int(n) for n in torch.bincount(self.labels, minlength=len(self.class_names))]


@dataclass(frozen=True, slots=True)
class PhantomData:
    """The three splits of one :class:`PhantomDataSpec`, with the time it took to prepare them."""

    spec: PhantomDataSpec
    preprocessing: PreprocessSpec
    train: PhantomSplit
    val: PhantomSplit
    test: PhantomSplit
    seconds: float

    def split(self, name: SplitName) -> PhantomSplit:
        result: PhantomSplit = getattr(self, name)
        return result


def _prepare_range(
    spec: PhantomDataSpec, split: SplitName, start: int, stop: int, preprocessing: PreprocessSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels of phantoms ``[start, stop)`` of ``split`` (a worker's share)."""
    images = np.empty((stop - start, 3, preprocessing.size, preprocessing.size), np.float32)
    labels = np.empty(stop - start, np.int64)
    for offset, index in enumerate(range(start, stop)):
        sample, labels[offset] = draw_phantom(spec, split, index)
        images[offset] = prepare_frame(sample, preprocessing, spec)
    return images, labels


def _worker_init() -> None:
    # One process per core does the parallel work; threads inside would only contend.
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def _scrub_params(fields: dict[str, Any]) -> ScrubParams:
    return ScrubParams(**fields)


def _reduce_scrub_params(params: ScrubParams) -> tuple[Any, tuple[dict[str, Any]]]:
    fields = _fields(params)
    fields["strips"] = dict(params.strips)
    return _scrub_params, (fields,)


# ScrubParams keeps its strips in a read-only mapping, which pickle refuses: worker processes
# get the fields with a plain dict and rebuild it (and so re-validate it).
copyreg.pickle(ScrubParams, _reduce_scrub_params)


def build_phantom_data(
    spec: PhantomDataSpec,
    preprocessing: PreprocessSpec,
    *,
    workers: int = 1,
    chunk: int = 32,
) -> PhantomData:
    """All three splits of ``spec``, prepared with the model's ``preprocessing``.

    Parameters
    ----------
    workers
        Processes drawing and cleaning phantoms in parallel (spawned, one thread each);
        1 prepares everything in this process. The result does not depend on it. Spawned
        workers import the caller's ``__main__``: a script needs the usual
        ``if __name__ == "__main__":`` guard.
    chunk
        Phantoms per task handed to a worker.
    """
    if workers < 1 or chunk < 1:
        raise ValueError(f"workers={workers}, chunk={chunk}: expected ≥ 1 each")
    start = time.perf_counter()
    task = get_task(spec.task)
    size = preprocessing.size
    images = {n: torch.empty((spec.size(n), 3, size, size), dtype=torch.float32) for n in SPLITS}
    labels = {n: torch.empty(spec.size(n), dtype=torch.int64) for n in SPLITS}
    ranges = [
        (name, lo, min(lo + chunk, spec.size(name)))
        for name in SPLITS
        for lo in range(0, spec.size(name), chunk)
    ]

    def store(name: SplitName, lo: int, hi: int, part: tuple[np.ndarray, np.ndarray]) -> None:
        images[name][lo:hi] = torch.from_numpy(part[0])
        labels[name][lo:hi] = torch.from_numpy(part[1])

    if workers == 1:
        for name, lo, hi in ranges:
            store(name, lo, hi, _prepare_range(spec, name, lo, hi, preprocessing))
    else:
        context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
            futures = {
                pool.submit(_prepare_range, spec, name, lo, hi, preprocessing): (name, lo, hi)
                for name, lo, hi in ranges
            }
            for future, (name, lo, hi) in futures.items():
                store(name, lo, hi, future.result())
    splits = {
        name: PhantomSplit(
            name, images[name], labels[name], list(spec.seeds(name)), task.class_names
        )
        for name in SPLITS
    }
    return PhantomData(
        spec,
        preprocessing,
        splits["train"],
        splits["val"],
        splits["test"],
        time.perf_counter() - start,
    )


def build_split(
    spec: PhantomDataSpec, split: SplitName, preprocessing: PreprocessSpec
) -> PhantomSplit:
    """Draw, clean and preprocess every phantom of one split (deterministic in ``spec``)."""
    images, labels = _prepare_range(spec, split, 0, spec.size(split), preprocessing)
    return PhantomSplit(
        split,
        torch.from_numpy(images),
        torch.from_numpy(labels),
        list(spec.seeds(split)),
        get_task(spec.task).class_names,
    )
