"""Eigen-CAM on ViT encoders: where in the frame the model's last block looks.

Eigen-CAM (Muhammad & Yeasin 2020, arXiv 2008.00299) projects the last block's token activations on
their first principal component: no gradients, no class target, so it runs under inference mode
and needs only the activations of the forward pass that classified the frame, plus a small SVD.
We capture the output of the layer DESIGN.md §3 names — the last block's first LayerNorm (timm
``blocks[-1].norm1``, open_clip ``transformer.resblocks[-1].ln_1``) — drop the prefix tokens
(CLS, registers), lay the patch tokens on their grid (14 × 14 for ViT-B/16, 16 × 16 for ViT-L/14
at 224 px), then project on the first principal component and scale as the ``grad-cam`` package's
``EigenCAM`` does (tested against it). CNN baselines (ResNet-50, VGG-19) give a feature map
already on its grid (``layout="NCHW"``).

An SVD's sign is arbitrary, and grad-cam clips negatives, so it can return the complement
of the salient region. We orient each projection so that its larger-magnitude side is positive
(the sign correction of Seg-Eigen-CAM, Chung & Ying 2025, Eq. 13): the few tokens that stand out
from the many similar ones are the ones that light up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

#: ``NLD``: tokens as (batch, length, dim), timm and open_clip ≥ 2.24 (batch_first);
#: ``LND``: (length, batch, dim), older open_clip towers (``transformer.batch_first`` False);
#: ``NCHW``: a CNN feature map (the ResNet-50 / VGG-19 baselines), already on its grid.
TokenLayout = Literal["NLD", "LND", "NCHW"]
_LAYOUTS: tuple[TokenLayout, ...] = ("NLD", "LND", "NCHW")


@dataclass(frozen=True, slots=True)
class CamTarget:
    """Which module's output Eigen-CAM reads and how its tokens map onto the patch grid.

    Attributes
    ----------
    layer
        Module whose output holds the token activations (the last block's first norm).
    grid
        Patch grid ``(rows, columns)``: 224 / patch size for square inputs.
    prefix_tokens
        Tokens before the patch tokens (1 for a CLS token, more with registers); 0 for ``NCHW``.
    layout
        ``NLD`` or ``LND`` token layout of ``layer``'s output, or ``NCHW`` for a feature map.
    """

    layer: torch.nn.Module
    grid: tuple[int, int]
    prefix_tokens: int = 1
    layout: TokenLayout = "NLD"

    def __post_init__(self) -> None:
        if not isinstance(self.layer, torch.nn.Module):
            raise TypeError(f"layer is a {type(self.layer).__name__}, expected a torch.nn.Module")
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"grid={self.grid}: expected (rows, columns), each >= 1")
        if self.prefix_tokens < 0:
            raise ValueError(f"prefix_tokens={self.prefix_tokens}: must be >= 0")
        if self.layout not in _LAYOUTS:
            raise ValueError(f"layout={self.layout!r}: expected one of {list(_LAYOUTS)}")
        if self.layout == "NCHW" and self.prefix_tokens:
            raise ValueError("a feature map (layout NCHW) has no prefix tokens")


@dataclass(frozen=True, slots=True)
class CamResult:
    """Eigen-CAM maps and the logits of the same forward pass.

    Attributes
    ----------
    maps
        ``(N, S, S)`` float32 in [0, 1] on the model input grid (S = input side), each map
        min-max scaled on its own.
    logits
        ``(N, outputs)`` float32: the model's answer for the same inputs, so explaining a frame
        needs no second forward pass.
    """

    maps: npt.NDArray[np.float32]
    logits: npt.NDArray[np.float32]


def tokens_to_grid(
    tokens: torch.Tensor, grid: tuple[int, int], prefix_tokens: int, layout: TokenLayout
) -> torch.Tensor:
    """``(N, L, D)`` (or ``(L, N, D)``) tokens → ``(N, D, rows, columns)`` float32 patch maps.

    An ``NCHW`` feature map is only checked against ``grid`` and cast to float32.

    Raises
    ------
    ValueError
        The token count is not ``prefix_tokens + rows * columns`` (the map is not ``grid``).
    """
    if layout == "NCHW":
        if tokens.ndim != 4 or tuple(tokens.shape[2:]) != tuple(grid):
            raise ValueError(
                f"feature map of shape {tuple(tokens.shape)}: expected (N, C, *{grid})"
            )
        return tokens.float()
    if tokens.ndim != 3:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)}: expected 3 dimensions")
    if layout == "LND":
        tokens = tokens.transpose(0, 1)
    n, length, dim = tokens.shape
    rows, columns = grid
    if length != prefix_tokens + rows * columns:
        raise ValueError(
            f"{length} tokens: expected {prefix_tokens} prefix + {rows}x{columns} patch tokens "
            f"(layout {layout})"
        )
    patches = tokens[:, prefix_tokens:, :].float()
    return patches.reshape(n, rows, columns, dim).permute(0, 3, 1, 2).contiguous()


def timm_vit_target(model: Any) -> CamTarget:
    """The Eigen-CAM target of a timm ``VisionTransformer``: ``blocks[-1].norm1``."""
    try:
        layer = model.blocks[-1].norm1
        grid = tuple(int(v) for v in model.patch_embed.grid_size)
        prefix = int(model.num_prefix_tokens)
    except (AttributeError, IndexError, TypeError) as exc:
        raise TypeError(
            f"{type(model).__name__} is not a timm VisionTransformer "
            "(needs blocks[-1].norm1, patch_embed.grid_size, num_prefix_tokens)"
        ) from exc
    return CamTarget(layer=layer, grid=(grid[0], grid[1]), prefix_tokens=prefix, layout="NLD")


def open_clip_target(visual: Any) -> CamTarget:
    """The Eigen-CAM target of an open_clip ``VisionTransformer`` (``model.visual``).

    ``transformer.resblocks[-1].ln_1``; one prefix token (``class_embedding``); the layout follows
    ``transformer.batch_first`` (True in open_clip ≥ 2.24, LND before).
    """
    try:
        layer = visual.transformer.resblocks[-1].ln_1
        grid = tuple(int(v) for v in visual.grid_size)
        batch_first = bool(getattr(visual.transformer, "batch_first", False))
        has_cls = getattr(visual, "class_embedding", None) is not None
    except (AttributeError, IndexError, TypeError) as exc:
        raise TypeError(
            f"{type(visual).__name__} is not an open_clip VisionTransformer "
            "(needs transformer.resblocks[-1].ln_1 and grid_size)"
        ) from exc
    return CamTarget(
        layer=layer,
        grid=(grid[0], grid[1]),
        prefix_tokens=1 if has_cls else 0,
        layout="NLD" if batch_first else "LND",
    )


def orient(projections: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Flip each projection (in place) so that its larger-magnitude side is positive."""
    for projection in projections:
        if abs(float(projection.min())) > abs(float(projection.max())):
            np.negative(projection, out=projection)
    return projections


def grid_activations(output: torch.Tensor, target: CamTarget) -> npt.NDArray[np.float32]:
    """The target layer's output as ``(N, D, rows, columns)`` float32 patch maps on the CPU."""
    grid = tokens_to_grid(output, target.grid, target.prefix_tokens, target.layout)
    return np.ascontiguousarray(grid.detach().cpu().numpy(), dtype=np.float32)


class OutputTap:
    """A forward hook on ``layer`` that keeps its tensor outputs (detached) in ``seen`` until
    :meth:`take` or :meth:`remove`."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.seen: list[torch.Tensor] = []
        self._handle = layer.register_forward_hook(self._hook)

    def _hook(self, _module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            self.seen.append(output.detach())

    def take(self) -> list[torch.Tensor]:
        """The outputs seen so far; the tap starts empty again."""
        seen, self.seen = self.seen, []
        return seen

    def remove(self) -> None:
        self._handle.remove()


@contextlib.contextmanager
def capture_output(layer: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect what ``layer`` outputs during the block; the hook is removed on leaving it."""
    tap = OutputTap(layer)
    try:
        yield tap.seen
    finally:
        tap.remove()


def first_component(activations: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Each map's tokens projected on their first principal component: ``(N, rows, columns)``.

    What grad-cam's ``get_2d_projection`` computes (centred tokens ``A`` times the first right
    singular vector ``v``), up to the sign, which :func:`orient` settles. ``A v = s u``, and
    ``u``, ``s²`` are the top eigenvector and eigenvalue of the small tokens × tokens Gram matrix
    ``A Aᵀ`` (196 × 196 for ViT-B/16): 3 ms a frame instead of grad-cam's 50 ms full SVD, which
    also builds the 768 × 768 ``Vᵀ`` it does not use. float64, so squaring costs no precision.
    """
    out = np.empty((activations.shape[0], *activations.shape[2:]), dtype=np.float32)
    for index, maps in enumerate(activations):
        tokens = np.nan_to_num(maps.reshape(maps.shape[0], -1).T.astype(np.float64), nan=0.0)
        tokens -= tokens.mean(axis=0)
        values, vectors = np.linalg.eigh(tokens @ tokens.T)
        top = vectors[:, -1] * np.sqrt(max(float(values[-1]), 0.0))
        out[index] = top.reshape(maps.shape[1:])
    return out


def cam_maps(
    activations: npt.NDArray[np.float32], size: tuple[int, int]
) -> npt.NDArray[np.float32]:
    """Eigen-CAM maps from activations already captured in a forward pass.

    What grad-cam's ``EigenCAM`` does with one target layer (its scaling function; the same
    projection, computed cheaper: :func:`first_component`), plus the sign correction: so a frame
    can be explained from the activations of the batched pass that classified it, without a
    second forward pass.

    Parameters
    ----------
    activations
        ``(N, D, rows, columns)`` (:func:`grid_activations`).
    size
        ``(height, width)`` of the model input the maps are laid on.

    Returns
    -------
    numpy.ndarray
        ``(N, height, width)`` float32 in [0, 1], each map min-max scaled on its own.
    """
    from pytorch_grad_cam.utils.image import scale_cam_image

    if activations.ndim != 4 or activations.shape[0] < 1:
        shape = activations.shape
        raise ValueError(f"activations of shape {shape}: expected (N>=1, D, rows, columns)")
    projections = orient(first_component(activations))
    height, width = size
    # grad-cam: clip, scale to the input (cv2 takes width, height), average the target layers'
    # maps (one here) and min-max scale the result again.
    scaled = scale_cam_image(np.maximum(projections, 0), (width, height))
    maps = scale_cam_image(np.maximum(scaled, 0))
    return np.ascontiguousarray(np.clip(maps, 0.0, 1.0), dtype=np.float32)


def _device_of(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def eigen_cam(
    model: torch.nn.Module,
    inputs: np.ndarray | torch.Tensor,
    target: CamTarget,
    *,
    bf16: bool = False,
) -> CamResult:
    """Eigen-CAM maps for a batch of model inputs, on the model grid.

    Runs one forward pass under ``torch.inference_mode`` (bf16 autocast when ``bf16``), on the
    model's device. The hook placed on ``target.layer`` is removed before returning, also when
    the forward pass fails.

    Parameters
    ----------
    model
        Inputs ``(N, 3, S, S)`` → logits ``(N, outputs)``; put in eval mode.
    inputs
        Preprocessed frames (:func:`pipelines.preprocess.preprocess_batch`).
    target
        :func:`timm_vit_target`, :func:`open_clip_target`, or a hand-made :class:`CamTarget`.
    bf16
        Autocast to bf16 (use the :class:`~pipelines.infer.Predictor`'s choice).

    Raises
    ------
    ValueError
        Inputs not ``(N, 3, S, S)`` float32, or the target layer did not run / did not produce
        ``prefix + rows * columns`` tokens.
    """
    batch = torch.as_tensor(inputs)
    if batch.ndim != 4 or batch.shape[0] < 1 or batch.shape[1] != 3:
        raise ValueError(f"inputs of shape {tuple(batch.shape)}: expected (N>=1, 3, S, S)")
    if batch.dtype != torch.float32:
        raise ValueError(f"inputs of dtype {batch.dtype}: expected float32")
    device = _device_of(model)
    with (
        capture_output(target.layer) as seen,
        torch.inference_mode(),
        torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16),
    ):
        logits = model(batch.to(device))
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"the model returned {type(logits).__name__}, expected a tensor")
    activations = grid_activations(layer_output(seen, target), target)
    maps = cam_maps(activations, (int(batch.shape[2]), int(batch.shape[3])))
    flat = logits.detach().float().cpu().reshape(maps.shape[0], -1).numpy()
    return CamResult(maps=maps, logits=np.ascontiguousarray(flat))


def layer_output(seen: list[torch.Tensor], target: CamTarget) -> torch.Tensor:
    """The first output :func:`capture_output` saw (grad-cam reads the first call, too).

    Raises
    ------
    ValueError
        The target layer did not run in the forward pass.
    """
    if not seen:
        raise ValueError(f"target layer {type(target.layer).__name__} did not run in the forward")
    return seen[0]
