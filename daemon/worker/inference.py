"""Models inside the ``analyze`` job: per-frame predictions, the instance result, its heatmap.

One pass over an instance's clean frames feeds every task that runs on it (:class:`TaskRun`);
frames are batched (``analysis.max_batch``) and never all held: each task keeps, per class, only
the frame most in favour of that class, which is all Eigen-CAM and the heatmap need once the
cine's aggregate names the reported class.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset

from daemon.models.cache import LoadedModel
from pipelines.clean import CleanFrame
from pipelines.explain import CamTarget, to_frame
from pipelines.infer import InstanceResult, Predictor, aggregate
from pipelines.preprocess import preprocess
from pipelines.report import Algorithm, ImageFinding, SourceImage, build_heatmap_sc, derive_uid

#: Manufacturer in TID 4019 and Contributing Equipment of everything we write.
MANUFACTURER = "usfmd"
#: Series numbers of our outputs: high, so PACS viewers list them after the modality's.
HEATMAP_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9900

_predictors: dict[int, Predictor] = {}
_predictors_lock = threading.Lock()


def predictor_for(loaded: LoadedModel) -> Predictor:
    """One :class:`Predictor` per model version in this process (the model moves to its device
    once); a newly activated version gets its own."""
    with _predictors_lock:
        found = _predictors.get(loaded.ref.id)
        if found is None:
            found = Predictor(
                loaded.model,
                loaded.task,
                device=loaded.device,
                bf16="on" if loaded.bf16 else "off",
                input_size=loaded.preprocessing.size,
            )
            _predictors.clear()  # older versions are no longer active here: free them
            _predictors[loaded.ref.id] = found
        return found


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
    model_input: npt.NDArray[np.float32]


@dataclass
class TaskRun:
    """One task's model over one instance's frames."""

    loaded: LoadedModel
    predictor: Predictor
    max_batch: int
    _inputs: list[npt.NDArray[np.float32]] = field(default_factory=list)
    _frames: list[CleanFrame] = field(default_factory=list)
    _probabilities: list[npt.NDArray[np.float32]] = field(default_factory=list)
    _best: dict[int, _Best] = field(default_factory=dict)

    def add(self, frame: CleanFrame) -> None:
        self._inputs.append(preprocess(frame.pixels, self.loaded.preprocessing))
        self._frames.append(frame)
        if len(self._inputs) >= self.max_batch:
            self.flush()

    def flush(self) -> None:
        if not self._inputs:
            return
        batch = np.stack(self._inputs)
        probs = np.asarray(self.predictor.predict(batch), dtype=np.float32)
        for row, (frame, model_input) in enumerate(zip(self._frames, self._inputs, strict=True)):
            index = frame.meta.frame_index
            for cls in range(probs.shape[1]):
                best = self._best.get(cls)
                if best is None or probs[row, cls] > best.probability:
                    self._best[cls] = _Best(
                        float(probs[row, cls]), index, np.array(frame.pixels), model_input
                    )
        self._probabilities.append(probs)
        self._inputs.clear()
        self._frames.clear()

    def result(self, method: str, k: int) -> InstanceResult:
        self.flush()
        if not self._probabilities:
            raise ValueError("no frame reached the model")
        table = np.concatenate(self._probabilities)
        return aggregate(table, self.loaded.task.class_names, method=method, k=k)  # type: ignore[arg-type]

    def best(self, class_index: int) -> _Best:
        return self._best[class_index]

    def explain(self, class_index: int) -> npt.NDArray[np.float32]:
        """Eigen-CAM of the frame most in favour of ``class_index``, on that frame's own grid."""
        best = self._best[class_index]
        cam = self.predictor.explain(best.model_input[None], cam_target(self.loaded)).maps[0]
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


def image_finding(
    loaded: LoadedModel, source: SourceImage, result: InstanceResult
) -> ImageFinding:
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
