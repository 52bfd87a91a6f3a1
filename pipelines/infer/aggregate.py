"""A cine's per-frame probabilities → one result for the instance.

A multi-frame ultrasound instance (a cine loop) is one DICOM object and gets one finding in the
SR, but the model sees frames. The per-class score over frames is their ``mean`` (robust, the
default), their ``max`` (a view that shows in any frame counts: probe sweeps), or the mean of the
``topk`` highest (between the two: one noisy frame cannot decide alone). The reported class has
the highest score; its *best frame* — the one the heat-map and the SR's image reference use — is
the frame giving that class the highest probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Method = Literal["mean", "max", "topk"]
METHODS: tuple[Method, ...] = ("mean", "max", "topk")

#: Rows of a probability table must sum to 1 within this (float32 softmax is good to ~1e-6).
_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True, slots=True)
class InstanceResult:
    """The reported finding for one instance.

    Attributes
    ----------
    class_index, class_name
        The reported class (highest aggregated score; the first on ties).
    probability
        Its aggregated score, in [0, 1].
    probabilities
        Every class's aggregated score in class order. For ``mean`` they sum to 1; for ``max``
        and ``topk`` each class is aggregated on its own, so they need not.
    best_frame
        0-based frame with the highest probability of the reported class (the first on ties).
    frames
        Frames aggregated.
    method, k
        How (``k`` is the number of frames actually averaged for ``topk``, else ``None``).
    """

    class_index: int
    class_name: str
    probability: float
    probabilities: tuple[float, ...]
    best_frame: int
    frames: int
    method: Method
    k: int | None = None


def _validated(probs: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    table = np.asarray(probs)
    if table.ndim != 2:
        raise ValueError(f"probabilities of shape {table.shape}: expected (frames, classes)")
    frames, width = table.shape
    if frames < 1:
        raise ValueError("probabilities hold no frame")
    if width != len(classes):
        raise ValueError(f"probabilities have {width} columns for the classes {list(classes)}")
    if width < 2:
        raise ValueError(f"{width} class: a finding needs at least two")
    if not np.issubdtype(table.dtype, np.floating):
        raise ValueError(f"probabilities of dtype {table.dtype}: expected floating point")
    table = table.astype(np.float64)
    if not np.isfinite(table).all():
        raise ValueError("probabilities contain NaN or infinity")
    if table.min() < 0.0 or table.max() > 1.0:
        raise ValueError(
            f"probabilities span [{table.min():.6g}, {table.max():.6g}]: expected values in [0, 1]"
        )
    sums = table.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > _SUM_TOLERANCE:
        raise ValueError(f"frame {worst}'s probabilities sum to {sums[worst]:.6g}, expected 1")
    return table


def aggregate(
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    method: Method = "mean",
    k: int = 3,
) -> InstanceResult:
    """Aggregate ``(frames, classes)`` per-frame probabilities into one instance result.

    Parameters
    ----------
    probs
        One row per frame in frame order (e.g. :meth:`Predictor.predict` output), rows summing to 1.
    classes
        Class names in column order (``TaskSpec.class_names``).
    method
        ``mean``, ``max`` or ``topk`` (mean of each class's ``k`` highest frame probabilities).
    k
        Frames averaged by ``topk``; a cine shorter than ``k`` averages all its frames.

    Raises
    ------
    ValueError
        Not a probability table matching ``classes``, unknown method, ``k < 1``.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {list(METHODS)}")
    if method == "topk" and k < 1:
        raise ValueError(f"k={k}: top-k needs k >= 1")
    table = _validated(probs, classes)
    frames = table.shape[0]
    used_k: int | None = None
    if method == "mean":
        scores = table.mean(axis=0)
    elif method == "max":
        scores = table.max(axis=0)
    else:
        used_k = min(k, frames)
        # Per class, the used_k largest values (order among them is irrelevant for the mean).
        top = np.partition(table, frames - used_k, axis=0)[frames - used_k :]
        scores = top.mean(axis=0)
    chosen = int(np.argmax(scores))
    best = int(np.argmax(table[:, chosen]))
    return InstanceResult(
        class_index=chosen,
        class_name=str(classes[chosen]),
        probability=float(np.clip(scores[chosen], 0.0, 1.0)),
        probabilities=tuple(float(v) for v in np.clip(scores, 0.0, 1.0)),
        best_frame=best,
        frames=frames,
        method=method,
        k=used_k,
    )
