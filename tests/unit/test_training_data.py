"""Phantom training data: deterministic, patient-disjoint splits, true labels, and the daemon's own
decode → scrub → inpaint → preprocess path; the tensor augmentations."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.clean import CleanParams, clean_instance
from pipelines.inpaint import InpaintParams
from pipelines.phantom import HEART_VIEWS, VENTRICULOMEGALY_MM, make_phantom
from pipelines.phantom.dicom import write_phantom
from pipelines.preprocess import USF_MAE, preprocess
from pipelines.tasks import get_task
from training.augment import NONE, Augmentation, affine_matrices, augment_batch, black_level
from training.phantom_data import (
    SPLIT_STRIDE,
    SPLITS,
    PhantomDataSpec,
    PhantomTaskError,
    build_split,
    demo_phantom_params,
    draw_phantom,
    phantom_task,
)

SMALL = demo_phantom_params(320, 240)


def _spec(task: str = "heart_view", **kw: object) -> PhantomDataSpec:
    fields: dict[str, object] = {"train": 6, "val": 3, "test": 3, "params": SMALL}
    fields.update(kw)
    return PhantomDataSpec(task, **fields)  # type: ignore[arg-type]


def test_tasks_the_phantom_cannot_label_are_refused() -> None:
    with pytest.raises(PhantomTaskError, match="image_quality"):
        _spec("image_quality")
    with pytest.raises(PhantomTaskError, match="no ground truth"):
        phantom_task("no_such_task")


@pytest.mark.parametrize("size", [(200, 200), (320, 240), (400, 300), (800, 600)])
def test_demo_params_scale_the_default_layout(size: tuple[int, int]) -> None:
    params = demo_phantom_params(*size)  # PhantomParams validates the fit itself
    sample = make_phantom(1, "heart", params, style="none")
    assert sample.annotated.shape == (size[1], size[0], 3)
    assert params.fan.top > params.annotation.phi_band_height
    assert sample.fan_mask.sum() > 0.2 * size[0] * size[1]


def test_splits_are_disjoint_and_stable_when_another_split_grows() -> None:
    spec = _spec()
    ranges = {name: set(spec.seeds(name)) for name in SPLITS}
    assert all(len(ranges[n]) == spec.size(n) for n in SPLITS)
    assert not ranges["train"] & ranges["val"]
    assert not ranges["train"] & ranges["test"]
    assert not ranges["val"] & ranges["test"]
    bigger = dataclasses.replace(spec, train=50)
    assert list(bigger.seeds("test")) == list(spec.seeds("test"))
    other = dataclasses.replace(spec, seed=1)
    assert not set(other.seeds("train")) & set().union(*ranges.values())
    with pytest.raises(ValueError, match="phantoms"):
        _spec(train=SPLIT_STRIDE)


def test_heart_view_labels_are_the_phantoms_own_and_balanced() -> None:
    spec = _spec(train=10)
    task = get_task("heart_view")
    for index, seed in enumerate(spec.seeds("train")):
        sample, label = draw_phantom(spec, "train", index)
        assert sample.seed == seed
        assert sample.labels.heart_view == task.class_names[label]
        # The phantom with that seed and view is exactly what was drawn.
        again = make_phantom(
            seed, "heart", SMALL, heart_view=sample.labels.heart_view, style=sample.style
        )
        assert np.array_equal(again.annotated, sample.annotated)
    labels = [draw_phantom(spec, "train", i)[1] for i in range(10)]
    assert sorted(labels) == sorted(list(range(len(HEART_VIEWS))) * 2)


def test_ventriculomegaly_widths_respect_the_margin_and_the_cut_off() -> None:
    spec = _spec("ventriculomegaly", train=12, vm_margin_mm=2.0)
    task = get_task("ventriculomegaly")
    for index in range(12):
        sample, label = draw_phantom(spec, "train", index)
        width = sample.labels.atrial_width_mm
        assert width is not None
        assert abs(width - VENTRICULOMEGALY_MM) >= 2.0
        assert task.class_names[label] == ("ventriculomegaly" if width >= 10.0 else "normal")
        assert sample.labels.ventriculomegaly == (label == 1)
    with pytest.raises(ValueError, match="vm_margin_mm"):
        _spec("ventriculomegaly", vm_margin_mm=6.0)


@pytest.fixture(scope="module")
def heart_split() -> torch.Tensor:
    return build_split(_spec(), "val", USF_MAE).images


def test_split_is_deterministic(heart_split: torch.Tensor) -> None:
    again = build_split(_spec(), "val", USF_MAE)
    assert torch.equal(again.images, heart_split)
    assert again.labels.tolist() == [0, 1, 2]
    assert again.class_counts() == [1, 1, 1, 0, 0]
    image, label = again[1]
    assert image.shape == (3, 224, 224) and label == 1


def test_frames_take_the_daemons_clean_and_preprocess_path(
    heart_split: torch.Tensor, tmp_path: Path
) -> None:
    """A split's tensor is what the analyze job makes of the phantom's DICOM file on disk."""
    spec = _spec()
    for index in range(spec.size("val")):
        sample, _ = draw_phantom(spec, "val", index)
        path = tmp_path / f"{index}.dcm"
        write_phantom(path, [sample])
        (frame,) = list(clean_instance(path, CleanParams()))  # the analyze job's own call
        assert frame.scrub is not None and frame.report.band_rows > 0
        expected = preprocess(frame.pixels, USF_MAE)
        assert np.array_equal(heart_split[index].numpy(), expected)
        # ...and not the raw frame: the patient strip and the overlay were cleaned away.
        assert not np.array_equal(heart_split[index].numpy(), preprocess(sample.annotated, USF_MAE))


def test_clean_settings_reach_the_frames() -> None:
    keep = CleanParams(inpaint=InpaintParams(colour_flow_min_area=1))
    default = build_split(_spec(val=1), "val", USF_MAE).images
    kept = build_split(_spec(val=1, clean=keep), "val", USF_MAE).images
    assert not torch.equal(default, kept)


def test_described_spec_is_json_and_names_the_clean_settings() -> None:
    import json

    record = _spec().describe()
    assert json.loads(json.dumps(record)) == record
    assert record["seed_ranges"]["val"] == [SPLIT_STRIDE, SPLIT_STRIDE + 3]
    assert record["clean"]["inpaint"]["colour_flow_min_area"] is None
    assert record["frame"] == {"width": 320, "height": 240}


# ---- augmentations on tensors ----------------------------------------------------------------


def _images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_no_augmentation_returns_the_batch_untouched() -> None:
    images = _images()
    assert augment_batch(images, NONE, torch.Generator(), black_level(USF_MAE)) is images


def test_certain_flips_are_exact_mirrors() -> None:
    images = _images()
    black = black_level(USF_MAE)
    g = torch.Generator().manual_seed(1)
    h = augment_batch(images, Augmentation(hflip=1.0), g, black)
    assert torch.allclose(h, images.flip(-1), atol=1e-5)
    v = augment_batch(images, Augmentation(vflip=1.0), g, black)
    assert torch.allclose(v, images.flip(-2), atol=1e-5)


def test_rotation_pads_with_black_and_draws_reproducibly() -> None:
    images = torch.zeros(2, 3, 32, 32)
    black = black_level(USF_MAE)
    aug = Augmentation(rotation_deg=45.0, crop_scale=(1.5, 2.0))
    out = augment_batch(images, aug, torch.Generator().manual_seed(5), black)
    # Grey level 0 under ImageNet statistics, in every corner the zoom-out uncovered.
    assert torch.allclose(out[:, :, 0, 0], black.expand(2, 3), atol=1e-5)
    assert black[0] == pytest.approx(-0.485 / 0.229)
    again = augment_batch(images, aug, torch.Generator().manual_seed(5), black)
    assert torch.equal(out, again)
    m = affine_matrices(1000, Augmentation(rotation_deg=90.0), torch.Generator().manual_seed(0))
    angles = torch.rad2deg(torch.atan2(m[:, 1, 0], m[:, 0, 0]))
    assert angles.min() >= -90.0 and angles.max() <= 90.0 and angles.std() > 40.0


def test_augmentation_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="hflip"):
        Augmentation(hflip=1.5)
    with pytest.raises(ValueError, match="crop_scale"):
        Augmentation(crop_scale=(0.9, 0.5))
