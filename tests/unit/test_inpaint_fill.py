"""The cropped Navier–Stokes fill against OpenCV's whole-frame fill, on synthetic masks that hit
every path: grey and colour crops in one frame, clusters at the frame's edges and corners,
a cluster inside another's hole, and in-place versus copied output."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipelines.inpaint.fill import fill_navier_stokes


def _frame_and_mask(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Speckle, grey on the left half and tinted on the right, with marks of every kind."""
    rng = np.random.default_rng(seed)
    grey = rng.integers(0, 256, (240, 320), dtype=np.uint8)
    frame = np.repeat(grey[..., None], 3, axis=2)
    frame[:, 160:, 2] = np.clip(frame[:, 160:, 2].astype(int) + 20, 0, 255).astype(np.uint8)
    mask = np.zeros((240, 320), np.uint8)
    mask[0:3, 0:40] = 1  # top-left corner
    mask[237:240, 300:320] = 1  # bottom-right corner
    mask[100:160, 0:2] = 1  # left edge
    cv2.circle(mask, (80, 120), 25, 1, 2)  # a ring...
    mask[118:122, 78:82] = 1  # ...with a blob in its hole
    cv2.line(mask, (40, 200), (140, 30), 1, 1)  # a diagonal line on grey
    cv2.line(mask, (170, 40), (300, 200), 1, 2)  # and one on the tinted half
    cv2.line(mask, (150, 60), (170, 60), 1, 1)  # a mark across the grey/tint border
    for _ in range(30):  # scattered dots
        y, x = int(rng.integers(0, 240)), int(rng.integers(0, 320))
        mask[y, x] = 1
    return frame, mask.astype(bool)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("radius", [1, 3, 5])
def test_cropped_fill_equals_the_whole_frame_fill(seed: int, radius: int) -> None:
    frame, mask = _frame_and_mask(seed)
    whole = cv2.inpaint(frame, mask.view(np.uint8), radius, cv2.INPAINT_NS)
    before = frame.copy()
    filled = fill_navier_stokes(frame, mask, radius)
    assert np.array_equal(frame, before), "the input changed without in_place"
    assert filled is not frame
    assert np.array_equal(filled[mask], whole[mask])
    assert np.array_equal(filled[~mask], frame[~mask])
    # In place: the same pixels, written into the caller's frame.
    in_place = fill_navier_stokes(frame, mask, radius, in_place=True)
    assert in_place is frame and np.array_equal(in_place, filled)


def test_grey_planes_and_read_only_frames() -> None:
    frame, mask = _frame_and_mask(4)
    plane = np.ascontiguousarray(frame[..., 0])
    whole = cv2.inpaint(plane, mask.view(np.uint8), 3, cv2.INPAINT_NS)
    assert np.array_equal(fill_navier_stokes(plane, mask, 3), whole)
    frame.setflags(write=False)
    copied = fill_navier_stokes(frame, mask, 3, in_place=True)  # cannot write: copies
    assert copied is not frame
    expected = cv2.inpaint(frame, mask.view(np.uint8), 3, cv2.INPAINT_NS)
    assert np.array_equal(copied, expected)


def test_frames_in_any_memory_layout() -> None:
    frame, mask = _frame_and_mask(6)
    expected = cv2.inpaint(frame, mask.view(np.uint8), 3, cv2.INPAINT_NS)
    bgr_view = np.ascontiguousarray(frame[..., ::-1])[..., ::-1]  # writeable, not C-contiguous
    assert not bgr_view.flags.c_contiguous
    filled = fill_navier_stokes(bgr_view, mask, 3, in_place=True)
    assert np.array_equal(filled, expected)
    wide = np.zeros((240, 400, 3), np.uint8)
    wide[:, 40:360] = frame
    roi = wide[:, 40:360]  # a window of a wider frame: rows strided
    assert np.array_equal(fill_navier_stokes(roi, mask, 3, in_place=True), expected)


def test_empty_mask_and_bad_masks() -> None:
    frame, mask = _frame_and_mask(5)
    empty = np.zeros_like(mask)
    assert np.array_equal(fill_navier_stokes(frame, empty, 3), frame)
    with pytest.raises(ValueError, match="expected"):
        fill_navier_stokes(frame, mask.view(np.uint8), 3)
    with pytest.raises(ValueError, match="expected"):
        fill_navier_stokes(frame, mask[:-1], 3)
