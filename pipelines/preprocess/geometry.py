"""Where each original pixel lands on the square model grid, and back.

A model sees a ``size`` x ``size`` image made from the frame by optional zero padding to a square
and a resize. :class:`GridMapping` records that affine map, so an Eigen-CAM heat-map computed on
the model grid can be laid over the original frame (secondary capture, DESIGN.md §4) and a box
found on the model grid can be reported in original pixel coordinates (TID 1410 image region).

Coordinates are continuous with pixel ``i`` covering ``[i, i + 1)``, so pixel centres sit at
``i + 0.5``. That is the convention OpenCV's ``INTER_LINEAR``, ``INTER_CUBIC`` and
``INTER_NEAREST_EXACT`` (and PIL) resample with, so the map below is exactly the one the pixels
went through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image

#: Not an OpenCV flag: tells :meth:`GridMapping.warp` to resize with PIL's antialiased bicubic.
PIL_BICUBIC: Final = -1


@dataclass(frozen=True, slots=True)
class GridMapping:
    """The pad-then-resize from a ``height`` x ``width`` frame to the ``size`` x ``size`` grid.

    Attributes
    ----------
    height, width
        The original frame's pixel grid.
    size
        Side of the square model grid.
    pad_top, pad_bottom, pad_left, pad_right
        Zero rows/columns added around the frame before resizing (all 0 for a squash).
    """

    height: int
    width: int
    size: int
    pad_top: int = 0
    pad_bottom: int = 0
    pad_left: int = 0
    pad_right: int = 0

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1 or self.size < 1:
            raise ValueError(
                f"height={self.height}, width={self.width}, size={self.size}: each must be >= 1"
            )
        pads = (self.pad_top, self.pad_bottom, self.pad_left, self.pad_right)
        if min(pads) < 0:
            raise ValueError(f"padding {pads} must not be negative")

    @classmethod
    def squash(cls, height: int, width: int, size: int) -> GridMapping:
        """Resize straight to the square, changing the aspect ratio (USF-MAE's loader)."""
        return cls(height=height, width=width, size=size)

    @classmethod
    def pad_to_square(cls, height: int, width: int, size: int) -> GridMapping:
        """Centre the frame on a zero square first, as FetalCLIP does.

        The odd pixel of padding goes to the bottom/right: FetalCLIP pastes the frame at
        ``((side - width) // 2, (side - height) // 2)`` of a black square.
        """
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        return cls(
            height=height,
            width=width,
            size=size,
            pad_top=top,
            pad_bottom=side - height - top,
            pad_left=left,
            pad_right=side - width - left,
        )

    @property
    def padded_height(self) -> int:
        return self.height + self.pad_top + self.pad_bottom

    @property
    def padded_width(self) -> int:
        return self.width + self.pad_left + self.pad_right

    @property
    def scale(self) -> tuple[float, float]:
        """Model pixels per original pixel, ``(x, y)``."""
        return self.size / self.padded_width, self.size / self.padded_height

    def to_model(self, x: float, y: float) -> tuple[float, float]:
        """Continuous original coordinates to continuous model-grid coordinates."""
        sx, sy = self.scale
        return (x + self.pad_left) * sx, (y + self.pad_top) * sy

    def to_original(self, u: float, v: float) -> tuple[float, float]:
        """Continuous model-grid coordinates to continuous original coordinates.

        Points inside the padding come back outside ``[0, width) x [0, height)``.
        """
        sx, sy = self.scale
        return u / sx - self.pad_left, v / sy - self.pad_top

    def box_to_original(self, box: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
        """Model-grid pixel box to the original pixels it covers; inclusive ``(x0, y0, x1, y1)``.

        Returns ``None`` when the box lies entirely in the padding.
        """
        u0, v0, u1, v1 = box
        x0, y0 = self.to_original(u0, v0)
        x1, y1 = self.to_original(u1 + 1, v1 + 1)
        left, top = max(math.floor(x0), 0), max(math.floor(y0), 0)
        right, bottom = min(math.ceil(x1), self.width) - 1, min(math.ceil(y1), self.height) - 1
        if right < left or bottom < top:
            return None
        return left, top, right, bottom

    def warp(self, frame: np.ndarray, interpolation: int) -> npt.NDArray[np.uint8]:
        """Apply the map to a ``(height, width[, 3])`` uint8 frame: pad with zeros, then resize."""
        if frame.shape[:2] != (self.height, self.width):
            raise ValueError(
                f"frame is {frame.shape[0]} x {frame.shape[1]}, "
                f"this mapping is for {self.height} x {self.width}"
            )
        if self.pad_top or self.pad_bottom or self.pad_left or self.pad_right:
            frame = cv2.copyMakeBorder(
                frame,
                self.pad_top,
                self.pad_bottom,
                self.pad_left,
                self.pad_right,
                cv2.BORDER_CONSTANT,
                value=0,
            )
        if interpolation == PIL_BICUBIC:
            size = (self.size, self.size)
            resized = Image.fromarray(frame).resize(size, Image.Resampling.BICUBIC)
            return np.asarray(resized, dtype=np.uint8)
        out = cv2.resize(frame, (self.size, self.size), interpolation=interpolation)
        return np.asarray(out, dtype=np.uint8)

    def inverse(self, heatmap: np.ndarray, *, nearest: bool = False) -> npt.NDArray[np.float32]:
        """Lay a model-grid map back on the original pixel grid: undo the resize, drop the pad.

        Parameters
        ----------
        heatmap
            ``(size, size)`` map on the model grid (e.g. Eigen-CAM upsampled to the input size).
        nearest
            Keep values as they are (class masks) instead of interpolating bilinearly.

        Returns
        -------
        numpy.ndarray
            ``(height, width)`` float32.
        """
        if heatmap.shape != (self.size, self.size):
            raise ValueError(f"heatmap shape {heatmap.shape}, expected {(self.size, self.size)}")
        flag = cv2.INTER_NEAREST_EXACT if nearest else cv2.INTER_LINEAR
        padded = cv2.resize(
            np.asarray(heatmap, dtype=np.float32),
            (self.padded_width, self.padded_height),
            interpolation=flag,
        )
        crop = padded[
            self.pad_top : self.pad_top + self.height, self.pad_left : self.pad_left + self.width
        ]
        return np.ascontiguousarray(crop, dtype=np.float32)
