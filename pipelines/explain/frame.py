"""Lay an Eigen-CAM map from the model grid back on the original frame's pixels.

The model saw the frame padded (FetalCLIP) and resized to a square (both families), so a map on the
model grid is the frame's map seen through that affine transform. :class:`GridMapping` records it;
undoing it is one bilinear resize to the *padded* frame size followed by cutting the padding off.
A map on the coarser patch grid (14 × 14) goes through the same single resize: its cells tile the
model grid uniformly, so interpolating once from the patch grid is exact where an upsample to
224 × 224 first would blur twice.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from pipelines.preprocess import GridMapping


def to_frame(cam: np.ndarray, mapping: GridMapping) -> npt.NDArray[np.float32]:
    """A ``(rows, columns)`` map on the model grid → ``(height, width)`` on the original frame.

    Parameters
    ----------
    cam
        Eigen-CAM map in [0, 1], on the model input grid (``size`` × ``size``, as
        :func:`~pipelines.explain.eigen_cam` returns it) or on the patch grid (e.g. 14 × 14).
    mapping
        The frame's map to the model grid: ``spec.to_model_grid(height, width)``.

    Returns
    -------
    numpy.ndarray
        float32 in [0, 1]. Values are not rescaled after the padding is cut off: a map whose
        peak lay in the padding keeps its lower values on the frame.

    Raises
    ------
    ValueError
        Not a 2-D map, or values outside [0, 1] or not finite.
    """
    values = np.asarray(cam, dtype=np.float32)
    if values.ndim != 2 or min(values.shape) < 1:
        raise ValueError(f"map of shape {values.shape}: expected (rows, columns)")
    if not np.isfinite(values).all():
        raise ValueError("map contains NaN or infinity")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"map spans [{low:.6g}, {high:.6g}]: expected values in [0, 1]")
    if values.shape == (mapping.size, mapping.size):
        return np.clip(mapping.inverse(values), 0.0, 1.0)
    padded = cv2.resize(
        values, (mapping.padded_width, mapping.padded_height), interpolation=cv2.INTER_LINEAR
    )
    crop = padded[
        mapping.pad_top : mapping.pad_top + mapping.height,
        mapping.pad_left : mapping.pad_left + mapping.width,
    ]
    return np.ascontiguousarray(np.clip(crop, 0.0, 1.0), dtype=np.float32)
