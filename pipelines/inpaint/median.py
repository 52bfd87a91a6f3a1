"""Exact local-median tests at the few pixels that need them.

The stroke detector asks, of bright pixels only, whether they stand ``contrast`` above the median
of their ``kernel``×``kernel`` neighbourhood. OpenCV's exact 9×9 median of a whole 800×600 frame
costs ~35 ms on one core (its histogram method; only 3×3 and 5×5 get a sorting network), more than
everything else in the pipeline together, while the answer is needed at ~1 % of the pixels. So the
question is answered there only, exactly:

    median of a window ≤ L  ⟺  at least ⌈k²/2⌉ of its k² pixels are ≤ L,

counted on the gathered windows — after one box filter has counted every window at two levels,
which settles about half of the bright pixels without reading their windows. The window is
edge-replicated at the frame's border, as ``cv2.medianBlur`` does, so the answers equal
``cv2.medianBlur(plane, k) <= L`` bit for bit.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

Plane = NDArray[np.uint8]
Pixels = NDArray[np.intp]


class LocalMedian:
    """Order tests on the ``kernel``×``kernel`` neighbourhoods of one uint8 plane.

    Parameters
    ----------
    plane
        H×W uint8.
    kernel
        Odd window side.
    """

    def __init__(self, plane: Plane, kernel: int) -> None:
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel={kernel}: expected an odd size ≥ 1")
        r = kernel // 2
        self.plane = plane
        self.kernel = kernel
        #: Pixels at or below the median: the median is the ``need``-th smallest.
        self.need = kernel * kernel // 2 + 1
        self._padded = cv2.copyMakeBorder(plane, r, r, r, r, cv2.BORDER_REPLICATE)
        self._windows = sliding_window_view(self._padded, (kernel, kernel))

    def count_at_most(self, level: int) -> NDArray[np.uint8 | np.uint16]:
        """For every pixel, how many of its window's pixels are ≤ ``level`` (one box filter).

        8-bit counts while they fit (kernel ≤ 15: 225 pixels), a cheaper filter than 16-bit.
        """
        below = (self.plane <= level).view(np.uint8)
        return np.asarray(
            cv2.boxFilter(
                below,
                cv2.CV_8U if self.kernel * self.kernel <= 255 else cv2.CV_16U,
                (self.kernel, self.kernel),
                normalize=False,
                borderType=cv2.BORDER_REPLICATE,
            )
        )

    def count_at_most_two(self, low: int, high: int) -> NDArray[np.uint16]:
        """:meth:`count_at_most` of ``low`` and of ``high`` from one box filter, packed.

        Each pixel's count at ``low`` is in bits 0–6, at ``high`` in bits 7–13 (a window of at
        most 127 pixels: ``kernel`` ≤ 11).
        """
        if self.kernel * self.kernel > 127:
            raise ValueError(f"kernel={self.kernel}: two 7-bit counts need kernel ≤ 11")
        packed = np.asarray(
            cv2.threshold(self.plane, high, 128, cv2.THRESH_BINARY_INV)[1], np.uint8
        )
        packed |= (self.plane <= low).view(np.uint8)
        return np.asarray(
            cv2.boxFilter(
                packed,
                cv2.CV_16U,
                (self.kernel, self.kernel),
                normalize=False,
                borderType=cv2.BORDER_REPLICATE,
            )
        )

    def at_most(self, pixels: Pixels, levels: NDArray[np.integer]) -> NDArray[np.bool_]:
        """Whether the median of the window at each flat index in ``pixels`` is ≤ its level.

        ``levels`` below 0 are never reached (a uint8 median is ≥ 0).
        """
        result = np.zeros(len(pixels), bool)
        reachable = np.flatnonzero(levels >= 0)
        if not reachable.size:
            return result
        ys, xs = np.divmod(pixels[reachable], self.plane.shape[1])
        windows = self._windows[ys, xs].reshape(len(reachable), -1)
        below = (windows <= levels[reachable, None].astype(np.uint8)).view(np.uint8)
        counts = cv2.reduce(below, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S).reshape(-1)
        result[reachable] = counts >= self.need
        return result


def brighter_than_median(
    bright: Plane,
    threshold: int,
    contrast: int,
    kernel: int,
    local: LocalMedian | None = None,
    hot: Pixels | None = None,
) -> Plane:
    """``(bright ≥ threshold) & (bright − median_kernel(bright) ≥ contrast)`` as 0/1, exactly.

    Parameters
    ----------
    bright
        H×W uint8.
    threshold
        Minimum level of a pixel to be considered.
    contrast
        How far above its neighbourhood's median the pixel must be (≥ 1).
    kernel
        Odd side of the neighbourhood.
    local
        The plane's :class:`LocalMedian` when the caller has one already.
    hot
        The flat indices of the pixels ≥ ``threshold`` (ascending) when the caller has them.

    Returns
    -------
    numpy.ndarray
        H×W uint8 of 0 and 1; equal to the same test against ``cv2.medianBlur(bright, kernel)``.
    """
    out = np.zeros(bright.shape, np.uint8)
    top = int(bright.max()) if bright.size else 0
    if top - contrast < 0:
        return out
    plane = bright.reshape(-1)
    if hot is None:
        pixels = np.flatnonzero(bright >= max(threshold, contrast))
    else:
        pixels = hot if threshold >= contrast else hot[plane[hot] >= contrast]
    if not pixels.size:
        return out
    local = local or LocalMedian(bright, kernel)
    need = local.need
    high = top - contrast
    if kernel > 11:
        # Necessary: the median is ≤ bright − contrast ≤ top − contrast, so at least ``need``
        # pixels of the window are ≤ top − contrast. One box filter discards flat bright areas.
        counts = local.count_at_most(high).reshape(-1)
        pixels = pixels[counts[pixels] >= need]
        levels = plane[pixels].astype(np.int16) - contrast
        out.reshape(-1)[pixels[local.at_most(pixels, levels)]] = 1
        return out
    # Window counts at two levels from one box filter decide most pixels without reading their
    # windows: at ``high`` = top − contrast (no level is above it: fewer than ``need`` there
    # fails the pixel, bone's flat bright areas; a pixel at ``high`` is then decided), and at
    # ``low``, midway down to the lowest level (a level at or above it passes with ``need``
    # there, one at or below it fails without). The rest are counted on their windows.
    levels = plane[pixels].astype(np.int16) - contrast
    low = (int(levels.min()) + high) // 2
    packed = local.count_at_most_two(low, high).reshape(-1)[pixels]
    at_low, at_high = (packed & 127) >= need, (packed >> 7) >= need
    passed = at_high & (((levels >= low) & at_low) | (levels == high))
    open_ = at_high & ~passed & ~((levels <= low) & ~at_low)
    flat = out.reshape(-1)
    flat[pixels[passed]] = 1
    unsure = pixels[open_]
    flat[unsure[local.at_most(unsure, levels[open_])]] = 1
    return out
