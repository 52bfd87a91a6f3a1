"""Classification metrics as the papers report them (DESIGN.md §3), from labels and probabilities.

Pure numpy, no scikit-learn: accuracy; per-class precision, recall and F1; their macro and
support-weighted means (the heart-view paper's precision/recall/F1 are support-weighted — its
recall equals its accuracy); the confusion matrix (rows: truth, columns: prediction); and for two
classes the ventriculomegaly paper's sensitivity, specificity and ROC AUC, the positive class being
the task's last (``ventriculomegaly``, ``adequate``). A class never predicted has precision 0, one
never present recall 0 — reported, not hidden.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt


def confusion_matrix(
    labels: npt.ArrayLike, predictions: npt.ArrayLike, num_classes: int
) -> npt.NDArray[np.int64]:
    """``(K, K)`` counts: row = true class, column = predicted class."""
    truth = np.asarray(labels, dtype=np.int64)
    pred = np.asarray(predictions, dtype=np.int64)
    if truth.shape != pred.shape or truth.ndim != 1:
        raise ValueError(f"labels {truth.shape} and predictions {pred.shape}: expected equal 1-D")
    for name, values in (("labels", truth), ("predictions", pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} outside 0..{num_classes - 1}")
    counts = np.bincount(truth * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def roc_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float | None:
    """Area under the ROC curve of ``scores`` for ``labels == 1``; ``None`` with one class only.

    The Mann–Whitney statistic with average ranks for ties: the probability that a random
    positive scores above a random negative, ties counting one half.
    """
    truth = np.asarray(labels).astype(bool)
    values = np.asarray(scores, dtype=np.float64)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    # Average rank (1-based) within each run of equal scores.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], len(values)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[truth].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def classification_metrics(
    labels: npt.ArrayLike,
    probabilities: npt.ArrayLike,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Every metric of a classifier's predictions, JSON-ready.

    Parameters
    ----------
    labels
        ``(N,)`` true class indices.
    probabilities
        ``(N, K)`` class probabilities in ``class_names`` order; the prediction is the argmax
        (for two classes: positive iff p(last) > p(first), i.e. p > 0.5).
    class_names
        The task's classes, in model-output order.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    truth = np.asarray(labels, dtype=np.int64)
    k = len(class_names)
    if probs.ndim != 2 or probs.shape[1] != k or probs.shape[0] != truth.shape[0]:
        raise ValueError(
            f"probabilities {probs.shape} and labels {truth.shape}: expected (N, {k}) and (N,)"
        )
    if truth.size == 0:
        raise ValueError("no predictions to score")
    predictions = probs.argmax(axis=1)
    matrix = confusion_matrix(truth, predictions, k)
    true_positive = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    per_class: dict[str, dict[str, float | int]] = {}
    for index, name in enumerate(class_names):
        precision = _ratio(true_positive[index], predicted[index])
        recall = _ratio(true_positive[index], support[index])
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall),
            "support": int(support[index]),
        }
    weights = support / support.sum()

    def mean(key: str, weighted: bool) -> float:
        values = np.array([per_class[n][key] for n in class_names], dtype=np.float64)
        return float((values * weights).sum() if weighted else values.mean())

    result: dict[str, Any] = {
        "n": int(truth.size),
        "accuracy": float(true_positive.sum() / truth.size),
        "macro_precision": mean("precision", False),
        "macro_recall": mean("recall", False),
        "macro_f1": mean("f1", False),
        "weighted_precision": mean("precision", True),
        "weighted_recall": mean("recall", True),
        "weighted_f1": mean("f1", True),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "classes": list(class_names),
    }
    if k == 2:
        positive = class_names[1]
        result["positive_class"] = positive
        result["sensitivity"] = per_class[positive]["recall"]
        result["specificity"] = per_class[class_names[0]]["recall"]
        result["auc"] = roc_auc(truth == 1, probs[:, 1])
    return result
