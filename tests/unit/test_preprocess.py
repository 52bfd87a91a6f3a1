"""Preprocess: registry, normalisation, interpolation, padding geometry and the way back."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipelines.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    FETALCLIP,
    IMAGENET_MEAN,
    IMAGENET_STD,
    USF_MAE,
    GridMapping,
    PreprocessSpec,
    available_specs,
    get_spec,
    preprocess,
    preprocess_batch,
    register_spec,
)

SPECS = sorted(available_specs())
RNG = np.random.default_rng(3)


def _frame(height: int = 600, width: int = 800) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- registry ---------------------------------------------------------------------------------


def test_registry_holds_the_two_published_recipes() -> None:
    assert {"usf-mae", "fetalclip"} <= set(SPECS)
    assert get_spec("usf-mae") == USF_MAE
    assert (USF_MAE.geometry, USF_MAE.interpolation, USF_MAE.size) == ("squash", "nearest", 224)
    assert (USF_MAE.mean, USF_MAE.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (FETALCLIP.geometry, FETALCLIP.interpolation) == ("pad", "pil-bicubic")
    assert FETALCLIP.mean == (0.48145466, 0.4578275, 0.40821073)
    assert FETALCLIP.std == (0.26862954, 0.26130258, 0.27577711)
    with pytest.raises(ValueError, match="unknown preprocessing spec 'vit-x'.*fetalclip"):
        get_spec("vit-x")


def test_specs_validate_and_round_trip() -> None:
    for name in SPECS:
        spec = get_spec(name)
        assert PreprocessSpec.from_dict(spec.as_dict()) == spec
    with pytest.raises(ValueError, match="std=.*positive"):
        PreprocessSpec("bad", "squash", "nearest", IMAGENET_MEAN, (0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="geometry='crop'"):
        PreprocessSpec("bad", "crop", "nearest", IMAGENET_MEAN, IMAGENET_STD)  # type: ignore[arg-type]
    assert register_spec(USF_MAE) is USF_MAE  # same values under the same name: fine
    with pytest.raises(ValueError, match="already registered"):
        register_spec(PreprocessSpec("usf-mae", "pad", "nearest", IMAGENET_MEAN, IMAGENET_STD))


# --- shape, dtype, normalisation --------------------------------------------------------------


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("shape", [(600, 800), (801, 599), (224, 224), (37, 1000)])
def test_shape_and_dtype(name: str, shape: tuple[int, int]) -> None:
    out = preprocess(_frame(*shape), get_spec(name))
    assert out.shape == (3, 224, 224) and out.dtype == np.float32 and out.flags.c_contiguous


@pytest.mark.parametrize("name", SPECS)
def test_grey_becomes_three_identical_channels(name: str) -> None:
    grey = _frame()[..., 0].copy()
    spec = get_spec(name)
    assert np.array_equal(preprocess(grey, spec), preprocess(np.dstack([grey] * 3), spec))
    with pytest.raises(ValueError, match="dtype float32"):
        preprocess(grey.astype(np.float32), spec)
    with pytest.raises(ValueError, match="shape"):
        preprocess(np.zeros((4, 4, 4), np.uint8), spec)


@pytest.mark.parametrize(
    ("spec", "mean", "std"),
    [(USF_MAE, IMAGENET_MEAN, IMAGENET_STD), (FETALCLIP, CLIP_MEAN, CLIP_STD)],
)
def test_normalisation_constants(
    spec: PreprocessSpec, mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    square = np.empty((300, 300, 3), np.uint8)
    square[...] = (0, 128, 255)
    out = preprocess(square, spec)
    expected = [(v / 255 - m) / s for v, m, s in zip((0, 128, 255), mean, std, strict=True)]
    for channel in range(3):
        assert np.allclose(out[channel], expected[channel], rtol=0, atol=1e-6)


# --- interpolation on known patterns ----------------------------------------------------------


def test_nearest_samples_pixel_centres_like_pil() -> None:
    stripes = np.zeros((448, 300, 3), np.uint8)
    stripes[:, :, 0] = (np.arange(300) % 256)[None, :]
    stripes[:, :, 1] = (np.arange(448) % 251)[:, None]
    mapping = USF_MAE.to_model_grid(448, 300)
    small = mapping.warp(stripes, USF_MAE.cv2_interpolation)
    columns = np.floor((np.arange(224) + 0.5) * 300 / 224).astype(int)
    rows = np.floor((np.arange(224) + 0.5) * 448 / 224).astype(int)
    assert np.array_equal(small[0, :, 0], stripes[0, columns, 0])
    assert np.array_equal(small[:, 0, 1], stripes[rows, 0, 1])
    pil = pytest.importorskip("PIL.Image")
    resized = pil.fromarray(stripes).resize((224, 224), pil.NEAREST)
    assert np.array_equal(small, np.asarray(resized))


def test_nearest_keeps_values_bicubic_blends_them() -> None:
    step = np.zeros((600, 600, 3), np.uint8)
    step[:, 301:] = 200  # an edge between two levels
    near = USF_MAE.to_model_grid(600, 600).warp(step, USF_MAE.cv2_interpolation)
    cubic = FETALCLIP.to_model_grid(600, 600).warp(step, FETALCLIP.cv2_interpolation)
    assert set(np.unique(near)) == {0, 200}
    levels = set(np.unique(cubic))
    assert {0, 200} <= levels and len(levels) > 2  # blended (and overshooting) across the edge
    flat = np.full((333, 333, 3), 77, np.uint8)
    assert np.all(FETALCLIP.to_model_grid(333, 333).warp(flat, cv2.INTER_CUBIC) == 77)


# --- geometry: padding and the inverse map ----------------------------------------------------


def test_zero_pad_is_centred_with_the_odd_pixel_last() -> None:
    wide = FETALCLIP.to_model_grid(601, 800)
    assert (wide.pad_top, wide.pad_bottom, wide.pad_left, wide.pad_right) == (99, 100, 0, 0)
    tall = FETALCLIP.to_model_grid(800, 600)
    assert (tall.pad_top, tall.pad_bottom, tall.pad_left, tall.pad_right) == (0, 0, 100, 100)
    assert USF_MAE.to_model_grid(601, 800) == GridMapping(601, 800, 224)


def test_pad_rows_hold_normalised_black() -> None:
    white = np.full((300, 400, 3), 255, np.uint8)  # 50 pad rows above and below: 28 model rows
    out = preprocess(white, FETALCLIP)
    black = [(0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]
    full = [(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]
    for channel in range(3):
        assert np.allclose(out[channel, :26], black[channel], atol=1e-6)
        assert np.allclose(out[channel, -26:], black[channel], atol=1e-6)
        assert np.allclose(out[channel, 30:194], full[channel], atol=1e-6)


@pytest.mark.parametrize("name", SPECS)
def test_points_round_trip(name: str) -> None:
    mapping = get_spec(name).to_model_grid(600, 800)
    for x, y in [(0.0, 0.0), (800.0, 600.0), (123.5, 456.25)]:
        u, v = mapping.to_model(x, y)
        assert mapping.to_original(u, v) == pytest.approx((x, y))
    if mapping.pad_top:
        assert mapping.to_model(0, 0) == pytest.approx((0.0, 224 * 100 / 800))
        assert mapping.to_model(800, 600) == pytest.approx((224.0, 224 * 700 / 800))
    else:
        assert mapping.to_model(800, 600) == pytest.approx((224.0, 224.0))


@pytest.mark.parametrize("name", SPECS)
def test_a_block_goes_there_and_back(name: str) -> None:
    spec = get_spec(name)
    frame = np.zeros((600, 800, 3), np.uint8)
    frame[200:300, 400:520] = 255  # original box x 400..519, y 200..299
    mapping = spec.to_model_grid(600, 800)
    bright = np.argwhere(mapping.warp(frame, spec.cv2_interpolation)[..., 0] > 128)
    (v0, u0), (v1, u1) = bright.min(axis=0), bright.max(axis=0)
    u_lo, v_lo = mapping.to_model(400, 200)
    u_hi, v_hi = mapping.to_model(520, 300)
    assert abs(u0 - u_lo) <= 1 and abs(v0 - v_lo) <= 1
    assert abs(u1 + 1 - u_hi) <= 1 and abs(v1 + 1 - v_hi) <= 1
    # The model-grid box maps back onto the original block (within one model pixel).
    box = mapping.box_to_original((int(u0), int(v0), int(u1), int(v1)))
    assert box is not None
    tolerance = 800 / 224 + 1
    assert np.allclose(box, (400, 200, 519, 299), atol=tolerance)
    # So does a heat-map that is hot exactly there.
    heat = np.zeros((224, 224), np.float32)
    heat[v0 : v1 + 1, u0 : u1 + 1] = 1.0
    back = mapping.inverse(heat)
    assert back.shape == (600, 800) and back.dtype == np.float32
    hot = np.argwhere(back >= 0.5)
    assert np.allclose([*hot.min(axis=0), *hot.max(axis=0)], (200, 400, 299, 519), atol=tolerance)


def test_inverse_drops_the_padding() -> None:
    mapping = FETALCLIP.to_model_grid(300, 400)
    heat = np.zeros((224, 224), np.float32)
    heat[:28] = 1.0  # exactly the top pad band
    assert mapping.inverse(heat).max() <= 0.5  # only the blended boundary row is touched
    assert mapping.box_to_original((0, 0, 223, 20)) is None
    assert np.all(mapping.inverse(np.full((224, 224), 0.25, np.float32)) == 0.25)
    labels = np.zeros((224, 224), np.float32)
    labels[100:120, 50:60] = 3.0
    assert set(np.unique(mapping.inverse(labels, nearest=True))) == {0.0, 3.0}
    with pytest.raises(ValueError, match="heatmap shape"):
        mapping.inverse(np.zeros((14, 14), np.float32))


# --- batches and speed ------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPECS)
def test_batch_equals_single_frames(name: str) -> None:
    spec = get_spec(name)
    frames = [_frame(), _frame(480, 640), _frame(100, 90)]
    batch = preprocess_batch(frames, spec)
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == np.float32
    for index, frame in enumerate(frames):
        assert np.array_equal(batch[index], preprocess(frame, spec))
    assert preprocess_batch(np.stack([frames[0]] * 2), spec).shape == (2, 3, 224, 224)


def test_fetalclip_resize_is_pils_antialiased_bicubic() -> None:
    from PIL import Image

    from pipelines.preprocess import FETALCLIP, preprocess

    rng = np.random.default_rng(7)
    frame = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)  # square: no padding involved
    expected = np.asarray(Image.fromarray(frame).resize((224, 224), Image.Resampling.BICUBIC))
    mean = np.asarray(FETALCLIP.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(FETALCLIP.std, dtype=np.float32)[:, None, None]
    want = (expected.transpose(2, 0, 1).astype(np.float32) / 255.0 - mean) / std
    np.testing.assert_allclose(preprocess(frame, FETALCLIP), want, atol=1e-5)
