"""Inference: per-frame probabilities on the best device, shared batches, per-instance results.

:class:`Predictor` runs a model (CUDA when present, else CPU; bf16 autocast where the hardware
multiplies bf16 natively) and turns logits into probabilities per the task's head;
:class:`Batcher` lets concurrent jobs share forward passes; :func:`aggregate` turns a cine's
per-frame probabilities into the instance's finding and best frame.
"""

from pipelines.infer.aggregate import METHODS, InstanceResult, Method, aggregate
from pipelines.infer.batcher import Batcher, BatcherStats, BatchFunction
from pipelines.infer.hardware import (
    BF16Switch,
    cpu_has_bf16,
    cpuinfo_has_bf16,
    device_has_bf16,
    resolve_bf16,
    select_device,
)
from pipelines.infer.predictor import (
    FRAME_ROW_FIELDS,
    FrameRows,
    InferenceError,
    Predictor,
    Probabilities,
    frame_rows,
    probabilities,
    store_linear_weights_bf16,
)

__all__ = [
    "FRAME_ROW_FIELDS",
    "METHODS",
    "BF16Switch",
    "BatchFunction",
    "Batcher",
    "BatcherStats",
    "FrameRows",
    "InferenceError",
    "InstanceResult",
    "Method",
    "Predictor",
    "Probabilities",
    "aggregate",
    "cpu_has_bf16",
    "cpuinfo_has_bf16",
    "device_has_bf16",
    "frame_rows",
    "probabilities",
    "resolve_bf16",
    "select_device",
    "store_linear_weights_bf16",
]
