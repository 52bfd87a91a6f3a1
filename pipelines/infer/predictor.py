"""Per-frame class probabilities from a classification model, on the best device at hand.

The model is any ``torch.nn.Module`` mapping ``(N, 3, S, S)`` float32 inputs (from
:func:`pipelines.preprocess.preprocess_batch`) to ``(N, task.num_outputs)`` logits; the task's head
(:class:`pipelines.tasks.TaskSpec`) says how logits become probabilities. Everything runs under
``torch.inference_mode`` and, where the hardware multiplies bf16 natively, bf16 autocast
(:mod:`pipelines.infer.hardware`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from pipelines.errors import PipelineError
from pipelines.explain.eigencam import OutputTap
from pipelines.infer.hardware import BF16Switch, resolve_bf16, select_device
from pipelines.tasks import TaskSpec

if TYPE_CHECKING:
    from pipelines.explain import CamResult, CamTarget

logger = logging.getLogger(__name__)

Probabilities = npt.NDArray[np.float32]


class InferenceError(PipelineError, RuntimeError):
    """The model produced something that is not a usable answer (wrong shape, NaN, ∞).

    A ``RuntimeError``: the model, not the frame, is at fault; the job should fail, not be retried
    with the same model.
    """


def probabilities(
    logits: torch.Tensor | np.ndarray, head: Literal["softmax", "sigmoid"]
) -> Probabilities:
    """Logits to per-class probabilities, rows summing to 1.

    Parameters
    ----------
    logits
        ``(N, C)`` for a softmax head; ``(N, 1)`` or ``(N,)`` for a sigmoid head, whose single
        logit is the probability of the *last* class (``TaskSpec`` convention): ``[1 - p, p]``.
    head
        The task's head.

    Returns
    -------
    numpy.ndarray
        ``(N, C)`` float32 (``C = 2`` for sigmoid), computed in float32 whatever the logits' dtype.

    Raises
    ------
    InferenceError
        Logits of the wrong shape for the head, or not finite.
    """
    values = torch.as_tensor(logits).detach().to(device="cpu", dtype=torch.float32)
    if head == "sigmoid":
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1:
            raise InferenceError(
                f"sigmoid head: logits of shape {tuple(values.shape)}, expected (N, 1) or (N,)"
            )
    elif head == "softmax":
        if values.ndim != 2 or values.shape[1] < 2:
            raise InferenceError(
                f"softmax head: logits of shape {tuple(values.shape)}, expected (N, C>=2)"
            )
    else:
        raise ValueError(f"head={head!r}: expected 'softmax' or 'sigmoid'")
    if not bool(torch.isfinite(values).all()):
        raise InferenceError("the model returned non-finite logits (NaN or infinity)")
    if head == "sigmoid":
        p = torch.sigmoid(values)
        out = torch.stack((1.0 - p, p), dim=1)
    else:
        out = torch.softmax(values, dim=1)
    return np.ascontiguousarray(out.numpy(), dtype=np.float32)


class Predictor:
    """A model on a device, returning per-frame class probabilities for one task.

    The predictor takes the module over: it is moved to the device and put in eval mode, not
    copied. Forward passes are serialised by a lock: Eigen-CAM hooks the model's modules, and a
    prediction running beside an explanation would otherwise feed the hook its activations.

    Parameters
    ----------
    model
        Inputs ``(N, 3, input_size, input_size)`` float32 → logits ``(N, task.num_outputs)``.
    task
        Classes and head (softmax / sigmoid) of the model's output.
    device
        ``None``: the first CUDA GPU when present, else CPU.
    bf16
        ``auto`` (default): bf16 autocast where the device multiplies bf16 natively (CUDA with
        bf16, CPU with AVX-512 BF16 / AMX); ``on`` / ``off`` force it.
    input_size
        Side of the square input the model was trained on.
    cam_target
        The Eigen-CAM layer whose activations :meth:`predict_with_activations` returns by
        default; watched by a hook for the predictor's lifetime (what a compiled model needs:
        a hook added later would make it recompile).
    compiled
        Run forward passes through ``torch.compile`` (inductor, weights frozen as constants):
        ViT-B/16 under bf16 on CPU ~1.1× faster with AVX512_BF16 and ~1.3-1.5× with AMX, where
        the eager model spends half its time outside the matmuls (casts, GELU, LayerNorm;
        docs/benchmarks.md, Inference). Needs a C++ compiler at run time; each process compiles
        on its first batches (seconds to a minute; :meth:`warm_up`).

    With bf16 (not compiled), the model's Linear weights are stored in bf16
    (:func:`store_linear_weights_bf16`): the predictor owns its model, which from then on runs
    only under autocast (:meth:`context`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        task: TaskSpec,
        *,
        device: str | torch.device | None = None,
        bf16: BF16Switch = "auto",
        input_size: int = 224,
        cam_target: CamTarget | None = None,
        compiled: bool = False,
    ) -> None:
        if input_size < 1:
            raise ValueError(f"input_size={input_size}: must be >= 1")
        self.task = task
        self.device = select_device(device)
        self.bf16 = resolve_bf16(bf16, self.device)
        self.input_size = input_size
        self.model = model.to(self.device).eval()
        self.cam_target = cam_target
        self.compiled = compiled
        self._lock = threading.Lock()
        # Kept for the predictor's lifetime: a hook added later would make a compiled model
        # recompile.
        self._tap = OutputTap(cam_target.layer) if cam_target is not None else None
        self._forward_module: Callable[[torch.Tensor], Any] = self.model
        if self.bf16 and not compiled:
            store_linear_weights_bf16(self.model)
        if compiled:
            from torch._inductor import config as inductor_config

            # Frozen weights let inductor pre-pack them for oneDNN (no per-call bf16 casts) and
            # fuse Linear + GELU; only safe because a predictor's model never changes.
            inductor_config.freezing = True
            self._forward_module = torch.compile(self.model)
        logger.info(
            "predictor ready",
            extra={
                "task": task.name,
                "device": str(self.device),
                "bf16_autocast": self.bf16,
                "compiled": compiled,
            },
        )

    def warm_up(self) -> None:
        """Run the batch shapes that make a compiled model compile (2, then 3: one graph for
        every batch size ≥ 2; 1 is specialised), so that no job waits for the compiler."""
        if not self.compiled:
            return
        for size in (2, 3, 1):
            self._forward(torch.zeros((size, *self.input_shape)))

    @property
    def preferred_batch(self) -> int:
        """A good ``max_batch`` for a :class:`~pipelines.infer.batcher.Batcher` on this device.

        CPU: 16. ViT-B/16 fp32 on two cores runs 7.8 frames/s at batch 8-16, 7.3 at 32 and 6.8
        at 64 (activations fall out of cache; docs/benchmarks.md, Inference). CUDA: 64, where
        small batches leave the GPU idle (not measured here: no GPU was lent).
        """
        return 64 if self.device.type == "cuda" else 16

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one frame's input, ``(3, S, S)``: what a batcher checks submissions against."""
        return (3, self.input_size, self.input_size)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Inference mode plus this predictor's autocast, for anything else run on its model."""
        with (
            torch.inference_mode(),
            torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16),
        ):
            yield

    def _as_input(self, inputs: np.ndarray | torch.Tensor) -> torch.Tensor:
        batch = torch.as_tensor(inputs)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(
                f"inputs of shape {tuple(batch.shape)}: expected (N, *{self.input_shape})"
            )
        if batch.shape[0] < 1:
            raise ValueError("inputs hold no frame")
        if batch.dtype != torch.float32:
            raise ValueError(f"inputs of dtype {batch.dtype}: expected float32 (preprocess output)")
        return batch.to(self.device, non_blocking=True)

    def _forward(
        self, inputs: np.ndarray | torch.Tensor
    ) -> tuple[npt.NDArray[np.float32], list[torch.Tensor]]:
        """Logits (float32, CPU) and what the ``cam_target`` layer output in the same pass."""
        batch = self._as_input(inputs)
        tap = self._tap
        with self._lock, self.context():
            if tap is not None:
                tap.take()  # drop outputs of forwards run outside the predictor
            out = self._forward_module(batch)
            # Taken under the lock: the next forward refills the tap.
            seen = [] if tap is None else tap.take()
        if not isinstance(out, torch.Tensor):
            raise InferenceError(f"the model returned {type(out).__name__}, expected a tensor")
        expected = self.task.num_outputs
        if out.ndim == 1 and expected == 1:
            out = out[:, None]
        if out.ndim != 2 or out.shape != (batch.shape[0], expected):
            raise InferenceError(
                f"task {self.task.name!r}: the model returned shape {tuple(out.shape)} for "
                f"{batch.shape[0]} frames, expected ({batch.shape[0]}, {expected})"
            )
        return np.ascontiguousarray(out.float().cpu().numpy()), seen

    def logits(self, inputs: np.ndarray | torch.Tensor) -> npt.NDArray[np.float32]:
        """Raw model outputs for ``(N, 3, S, S)`` float32 inputs, as float32 on the CPU."""
        return self._forward(inputs)[0]

    def predict(self, inputs: np.ndarray | torch.Tensor) -> Probabilities:
        """Per-frame class probabilities ``(N, len(task.classes))``, in the task's class order."""
        return probabilities(self.logits(inputs), self.task.head)

    def predict_with_activations(self, inputs: np.ndarray | torch.Tensor) -> FrameRows:
        """Probabilities plus the ``cam_target`` layer's activations, from one forward pass, one
        row a frame.

        What a frame's later Eigen-CAM needs (:func:`pipelines.explain.cam_maps`), so the
        reported frame of an instance is explained from the batched pass that classified it.
        Rows are a structured array (:data:`FRAME_ROW_FIELDS`) so that a
        :class:`~pipelines.infer.Batcher` can hand each caller its own rows.

        Raises
        ------
        ValueError
            The predictor has no ``cam_target``, or that layer did not run.
        """
        from pipelines.explain.eigencam import grid_activations, layer_output

        target = self.cam_target
        if target is None:
            raise ValueError("the predictor has no cam_target to take activations from")
        logits, seen = self._forward(inputs)
        activations = grid_activations(layer_output(seen, target), target)
        return frame_rows(probabilities(logits, self.task.head), activations)

    def explain(self, inputs: np.ndarray | torch.Tensor, target: CamTarget) -> CamResult:
        """Eigen-CAM maps (and logits) for ``inputs``, with this predictor's device and precision.

        ``target`` names a module of *this* model (e.g. ``timm_vit_target(predictor.model)``).
        ``probabilities(result.logits, task.head)`` gives the frames' probabilities from the same
        forward pass. Runs the eager model (a compiled one would recompile for a new hook).
        """
        from pipelines.explain import eigen_cam  # grad-cam is only imported when explaining

        batch = self._as_input(inputs)
        with self._lock:
            try:
                return eigen_cam(self.model, batch, target, bf16=self.bf16)
            finally:
                if self._tap is not None:
                    self._tap.take()


def store_linear_weights_bf16(model: torch.nn.Module) -> None:
    """Store every Linear layer's weight and bias of ``model`` in bf16, in place.

    Autocast casts a Linear's fp32 weight to bf16 on every forward pass (its cast cache lasts one
    autocast region): ~9 % of an eager ViT-B/16 batch of 16 on an AVX512_BF16 CPU, reading 344
    MB and writing 172 MB a pass. Under autocast, a layer whose weight is already bf16 computes
    the same products bit for bit (tested) without that traffic: 15.8 -> 18.0 frames/s there
    (docs/benchmarks.md, Inference). Other layers (norms, convolutions) keep fp32, as autocast
    wants them. The model must then run under autocast only.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                for name in ("weight", "bias"):
                    parameter = getattr(module, name)
                    if parameter is not None and parameter.dtype == torch.float32:
                        parameter.data = parameter.data.to(torch.bfloat16)


#: A structured array, one row per frame: ``probabilities`` (classes,) and ``activations``
#: (D, rows, columns) float32 (:meth:`Predictor.predict_with_activations`).
FrameRows = npt.NDArray[np.void]
FRAME_ROW_FIELDS = ("probabilities", "activations")


def frame_rows(
    probabilities: npt.NDArray[np.float32], activations: npt.NDArray[np.float32]
) -> FrameRows:
    """Pack per-frame probabilities ``(N, C)`` and activations ``(N, ...)`` into ``N`` rows."""
    if probabilities.shape[0] != activations.shape[0]:
        raise ValueError(
            f"{probabilities.shape[0]} probability rows for {activations.shape[0]} activations"
        )
    dtype = np.dtype(
        [
            ("probabilities", np.float32, probabilities.shape[1:]),
            ("activations", np.float32, activations.shape[1:]),
        ]
    )
    rows = np.empty(probabilities.shape[0], dtype=dtype)
    rows["probabilities"] = probabilities
    rows["activations"] = activations
    return rows
