"""Explanations: Eigen-CAM heat-maps on ViT encoders, laid back on the original frame.

:func:`eigen_cam` computes maps on the model grid (no gradients; inference mode, bf16 if asked);
:func:`cam_maps` computes them from activations a batched forward pass already captured;
:func:`to_frame` undoes the preprocessing geometry (:class:`pipelines.preprocess.GridMapping`)
so the map can be overlaid on the frame the sonographer saw (secondary capture, DESIGN.md §4).
"""

from pipelines.explain.eigencam import (
    CamResult,
    CamTarget,
    TokenLayout,
    cam_maps,
    capture_output,
    eigen_cam,
    first_component,
    grid_activations,
    open_clip_target,
    timm_vit_target,
    tokens_to_grid,
)
from pipelines.explain.frame import to_frame

__all__ = [
    "CamResult",
    "CamTarget",
    "TokenLayout",
    "cam_maps",
    "capture_output",
    "eigen_cam",
    "first_component",
    "grid_activations",
    "open_clip_target",
    "timm_vit_target",
    "to_frame",
    "tokens_to_grid",
]
