"""Models inside the ``analyze`` job: per-frame predictions, the instance result, its heatmap.

One pass over an instance's clean frames feeds every task that runs on it (:class:`TaskRun`).
Each frame goes to its model's :class:`~pipelines.infer.Batcher`, shared by every job of the
worker process (:mod:`daemon.worker.batching`), so frames of concurrent jobs share forward
passes; the job thread goes on decoding while its frames wait. Frames are never all held: a
task keeps, per class, only the frame most in favour of that class, which is all Eigen-CAM and
the heatmap need once the cine's aggregate names the reported class.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset

from daemon.models.cache import LoadedModel
from pipelines.clean import CleanFrame
from pipelines.explain import CamTarget, cam_maps, to_frame
from pipelines.infer import Batcher, FrameRows, InstanceResult, Predictor, aggregate
from pipelines.preprocess import preprocess
from pipelines.report import Algorithm, ImageFinding, SourceImage, build_heatmap_sc, derive_uid

#: Manufacturer in TID 4019 and Contributing Equipment of everything we write.
MANUFACTURER = "usfmd"
#: Series numbers of our outputs: high, so PACS viewers list them after the modality's.
HEATMAP_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9900

#: Per task: the version id and the predictor of its model in this process.
_predictors: dict[str, tuple[int, Predictor]] = {}
#: Guards the two dicts only; building a predictor holds its task's own lock, so a minute of
#: compiling one task's model (``models.compile``) never holds up another task's jobs.
_predictors_lock = threading.Lock()
_building: dict[str, threading.Lock] = {}


def predictor_for(loaded: LoadedModel) -> Predictor:
    """One :class:`Predictor` per task's model version in this process (the model moves to its
    device once); a newly activated version replaces its task's older one."""
    name = loaded.task.name
    with _predictors_lock:
        found = _current(loaded)
        if found is not None:
            return found
        building = _building.setdefault(name, threading.Lock())
    with building:
        # Another job of this task may have built it while this one waited.
        with _predictors_lock:
            found = _current(loaded)
        if found is not None:
            return found
        predictor = Predictor(
            loaded.model,
            loaded.task,
            device=loaded.device,
            bf16="on" if loaded.bf16 else "off",
            input_size=loaded.preprocessing.size,
            cam_target=cam_target(loaded),
            compiled=loaded.compiled,
        )
        predictor.warm_up()
        with _predictors_lock:
            _predictors[name] = (loaded.ref.id, predictor)
        return predictor


def _current(loaded: LoadedModel) -> Predictor | None:
    """This version's predictor if this process has built it (caller holds the lock)."""
    found = _predictors.get(loaded.task.name)
    if found is not None and found[0] == loaded.ref.id and found[1].model is loaded.model:
        return found[1]
    return None


def cam_target(loaded: LoadedModel) -> CamTarget:
    """Eigen-CAM's target from the encoder card (DESIGN.md §3: the last block's first norm)."""
    card = loaded.card
    grid = card.grid
    if card.layout == "tokens" and grid is not None:
        return CamTarget(
            layer=loaded.model.target_layer,
            grid=grid,
            prefix_tokens=card.num_prefix_tokens,
            layout="NLD",
        )
    # A CNN baseline: its feature map's own grid.
    return CamTarget(layer=loaded.model.target_layer, grid=_feature_grid(loaded), layout="NCHW")


def _feature_grid(loaded: LoadedModel) -> tuple[int, int]:
    import torch

    size = loaded.preprocessing.size
    seen: list[tuple[int, int]] = []
    hook = loaded.model.target_layer.register_forward_hook(
        lambda _m, _i, out: seen.append((int(out.shape[-2]), int(out.shape[-1])))
    )
    try:
        with torch.inference_mode():
            loaded.model(torch.zeros(1, 3, size, size, device=loaded.device))
    finally:
        hook.remove()
    return seen[0]


@dataclass
class _Best:
    probability: float
    frame_index: int
    pixels: npt.NDArray[np.uint8]
    #: The Eigen-CAM target layer's output for this frame, from the batched forward pass.
    activations: npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class _InFlight:
    frame: CleanFrame
    rows: Future[FrameRows]


@dataclass
class TaskRun:
    """One task's model over one instance's frames.

    Each frame is submitted to ``batcher`` as soon as it is preprocessed; at most ``in_flight``
    frames await their probabilities (then the job waits for the oldest), which bounds the
    memory one job holds while letting it decode ahead of the model. The batcher returns each
    frame's probabilities with its Eigen-CAM activations
    (:meth:`~pipelines.infer.Predictor.predict_with_activations`): the reported frame is
    explained from the pass that classified it, with no second forward pass.
    """

    loaded: LoadedModel
    batcher: Batcher
    in_flight: int = 32
    _waiting: deque[_InFlight] = field(default_factory=deque)
    _probabilities: list[npt.NDArray[np.float32]] = field(default_factory=list)
    _best: dict[int, _Best] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.in_flight < 1:
            raise ValueError(f"in_flight={self.in_flight}: must be >= 1")

    def add(self, frame: CleanFrame) -> None:
        model_input = preprocess(frame.pixels, self.loaded.preprocessing)
        self._waiting.append(_InFlight(frame, self.batcher.submit(model_input[None])))
        while len(self._waiting) >= self.in_flight:
            self._settle_oldest()

    def flush(self) -> None:
        """Wait for every submitted frame's probabilities."""
        while self._waiting:
            self._settle_oldest()

    def _settle_oldest(self) -> None:
        waiting = self._waiting.popleft()
        (row,) = waiting.rows.result()
        probabilities = np.asarray(row["probabilities"], dtype=np.float32)
        index = waiting.frame.meta.frame_index
        for cls, probability in enumerate(probabilities):
            best = self._best.get(cls)
            if best is None or probability > best.probability:
                self._best[cls] = _Best(
                    float(probability), index, np.array(waiting.frame.pixels), row["activations"]
                )
        self._probabilities.append(probabilities)

    def result(self, method: str, k: int) -> InstanceResult:
        self.flush()
        if not self._probabilities:
            raise ValueError("no frame reached the model")
        table = np.stack(self._probabilities)
        return aggregate(table, self.loaded.task.class_names, method=method, k=k)  # type: ignore[arg-type]

    def best(self, class_index: int) -> _Best:
        return self._best[class_index]

    def explain(self, class_index: int) -> npt.NDArray[np.float32]:
        """Eigen-CAM of the frame most in favour of ``class_index``, on that frame's own grid."""
        best = self._best[class_index]
        size = self.loaded.preprocessing.size
        cam = cam_maps(best.activations[None], (size, size))[0]
        rows, columns = best.pixels.shape[:2]
        mapping = self.loaded.preprocessing.to_model_grid(rows, columns)
        return to_frame(cam, mapping)


def source_image(path: str) -> SourceImage:
    """The source reference of a finding: the whole instance (a cine's finding aggregates its
    frames and names its best frame itself)."""
    return SourceImage.from_dataset(dcmread(path, stop_before_pixels=True))


def algorithm(loaded: LoadedModel) -> Algorithm:
    ref = loaded.ref
    return Algorithm(
        name=ref.algorithm_name,
        version=ref.version,
        manufacturer=MANUFACTURER,
        device_uid=ref.device_uid,
        parameters={
            "encoder": ref.encoder,
            "preprocessing": ref.preprocessing,
            "sha256": ref.sha256[:16],
        },
        synthetic=ref.synthetic,
    )


def image_finding(loaded: LoadedModel, source: SourceImage, result: InstanceResult) -> ImageFinding:
    task = loaded.task
    return ImageFinding(
        source=source,
        task=task,
        class_name=result.class_name,
        probability=result.probability,
        class_probabilities=dict(zip(task.class_names, result.probabilities, strict=True)),
        best_frame=result.best_frame + 1 if result.frames > 1 else None,
        aggregation=result.method if result.frames > 1 else None,
    )


def heatmap(
    run: TaskRun, finding: ImageFinding, result: InstanceResult, created: datetime
) -> Dataset:
    """The Secondary Capture of ``finding`` on its best frame (deterministic UIDs: a re-run
    rebuilds the same object, which the outbox then recognises)."""
    best = run.best(result.class_index)
    ref = run.loaded.ref
    source_uid = finding.source.sop_instance_uid
    study_uid = finding.source.study_instance_uid
    return build_heatmap_sc(
        finding,
        algorithm(run.loaded),
        best.pixels,
        run.explain(result.class_index),
        series_instance_uid=derive_uid("sc-series", study_uid, ref.device_uid),
        series_number=HEATMAP_SERIES_NUMBER,
        sop_instance_uid=derive_uid("sc", ref.device_uid, source_uid, str(best.frame_index)),
        created=created,
    )
