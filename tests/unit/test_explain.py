"""Eigen-CAM on timm and open_clip ViTs, and laying the map back on the original frame."""

from __future__ import annotations

import functools
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from timm.models.vision_transformer import VisionTransformer

from pipelines.explain import (
    CamTarget,
    cam_maps,
    eigen_cam,
    first_component,
    open_clip_target,
    timm_vit_target,
    to_frame,
    tokens_to_grid,
)
from pipelines.infer import FRAME_ROW_FIELDS, Batcher, Predictor, probabilities
from pipelines.preprocess import FETALCLIP, USF_MAE, GridMapping, preprocess_batch
from pipelines.tasks import get_task


def _timm_vit(reg_tokens: int = 0) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=224,
        patch_size=16,
        embed_dim=64,
        depth=2,
        num_heads=2,
        num_classes=3,
        reg_tokens=reg_tokens,
    )
    assert model.pos_embed is not None
    with torch.no_grad():
        # Without position embeddings identical patches give identical tokens, so the only
        # structure the last block sees is the image's: the hot region is known exactly.
        model.pos_embed.zero_()
    return model.eval()


def _open_clip_vit() -> OpenClipVisionTransformer:
    torch.manual_seed(0)
    model = OpenClipVisionTransformer(
        image_size=224, patch_size=14, width=64, layers=2, heads=2, mlp_ratio=4.0, output_dim=8
    )
    with torch.no_grad():
        model.positional_embedding.zero_()
    return model.eval()


def _hooks(layer: torch.nn.Module) -> int:
    return len(layer._forward_hooks) + len(layer._forward_pre_hooks)


# --- tokens to the patch grid --------------------------------------------------------------------
def test_tokens_to_grid_drops_prefix_and_handles_both_layouts() -> None:
    n, prefix, rows, columns, dim = 2, 3, 4, 5, 6
    tokens = torch.zeros(n, prefix + rows * columns, dim)
    tokens[:, :prefix] = -1.0  # prefix tokens must not show up
    tokens[:, prefix:, 0] = torch.arange(rows * columns, dtype=torch.float32)
    grid = tokens_to_grid(tokens, (rows, columns), prefix, "NLD")
    assert grid.shape == (n, dim, rows, columns) and grid.dtype == torch.float32
    expected = torch.arange(rows * columns, dtype=torch.float32).reshape(rows, columns)
    torch.testing.assert_close(grid[1, 0], expected)  # row-major patch order
    assert grid.min() >= 0
    lnd = tokens_to_grid(tokens.transpose(0, 1).bfloat16(), (rows, columns), prefix, "LND")
    torch.testing.assert_close(lnd, grid)
    with pytest.raises(ValueError, match="patch tokens"):
        tokens_to_grid(tokens, (rows, columns), prefix + 1, "NLD")


def test_timm_target_finds_the_last_norm1_grid_and_prefix() -> None:
    model = _timm_vit()
    target = timm_vit_target(model)
    assert target.layer is model.blocks[-1].norm1
    assert (target.grid, target.prefix_tokens, target.layout) == ((14, 14), 1, "NLD")
    assert timm_vit_target(_timm_vit(reg_tokens=4)).prefix_tokens == 5
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        timm_vit_target(torch.nn.Linear(2, 2))


def test_open_clip_target_follows_the_installed_token_layout() -> None:
    visual = _open_clip_vit()
    target = open_clip_target(visual)
    assert target.layer is visual.transformer.resblocks[-1].ln_1
    assert (target.grid, target.prefix_tokens) == ((16, 16), 1)
    # open_clip >= 2.24 runs its transformer batch-first; the tokens ln_1 sees are (N, L, D).
    assert visual.transformer.batch_first is True and target.layout == "NLD"
    seen: list[tuple[int, ...]] = []
    handle = target.layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    with torch.inference_mode():
        visual(torch.zeros(3, 3, 224, 224))
    handle.remove()
    assert seen == [(3, 1 + 16 * 16, 64)]
    # An older, sequence-first tower is read as LND.
    old = SimpleNamespace(
        transformer=SimpleNamespace(resblocks=visual.transformer.resblocks, batch_first=False),
        grid_size=(16, 16),
        class_embedding=visual.class_embedding,
    )
    assert open_clip_target(old).layout == "LND"


def test_cam_target_validates() -> None:
    layer = torch.nn.LayerNorm(4)
    with pytest.raises(ValueError, match="grid"):
        CamTarget(layer, (0, 14))
    with pytest.raises(ValueError, match="prefix_tokens"):
        CamTarget(layer, (14, 14), prefix_tokens=-1)
    with pytest.raises(ValueError, match="layout"):
        CamTarget(layer, (14, 14), layout="DNL")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="torch.nn.Module"):
        CamTarget("blocks.11.norm1", (14, 14))  # type: ignore[arg-type]


# --- Eigen-CAM on the model grid -----------------------------------------------------------------
def _hot_inputs() -> torch.Tensor:
    x = torch.zeros(2, 3, 224, 224)
    x[0, :, 32:64, 160:208] = 3.0  # patches rows 2-3, columns 10-12
    x[1, :, 112:160, 16:48] = 3.0  # patches rows 7-9, columns 1-2
    return x


@pytest.mark.parametrize("bf16", [False, True])
def test_eigen_cam_lights_up_the_known_region_and_leaves_no_hooks(bf16: bool) -> None:
    model = _timm_vit()
    target = timm_vit_target(model)
    x = _hot_inputs()
    result = eigen_cam(model, x, target, bf16=bf16)
    assert result.maps.shape == (2, 224, 224) and result.maps.dtype == np.float32
    assert result.maps.min() >= 0.0 and result.maps.max() <= 1.0
    with torch.inference_mode():
        logits = model(x)
    np.testing.assert_allclose(result.logits, logits.numpy(), atol=0.05 if bf16 else 1e-5)
    for index, (rows, columns) in enumerate([((2, 4), (10, 13)), ((7, 10), (1, 3))]):
        # One value per patch at its centre pixel, which sits 1/32 patch off the patch's centre,
        # so bilinear upsampling mixes in up to 1/32 of each neighbour along each axis.
        centres = result.maps[index, 8::16, 8::16]
        hot = np.zeros((14, 14), bool)
        hot[rows[0] : rows[1], columns[0] : columns[1]] = True
        assert centres[hot].min() > 0.9, centres[hot]
        assert centres[~hot].max() < 0.1
    assert _hooks(target.layer) == 0


def test_eigen_cam_on_an_open_clip_tower_under_inference_mode() -> None:
    visual = _open_clip_vit()
    x = torch.zeros(1, 3, 224, 224)
    x[0, :, 14 * 3 : 14 * 6, 14 * 9 : 14 * 11] = 2.5
    with torch.inference_mode():  # an outer inference context must not matter
        result = eigen_cam(visual, x, open_clip_target(visual))
    centres = result.maps[0, 7::14, 7::14]
    assert centres.shape == (16, 16)
    hot = np.zeros((16, 16), bool)
    hot[3:6, 9:11] = True
    assert centres[hot].min() > 0.9 and centres[~hot].max() < 0.1
    assert result.logits.shape == (1, 8)


def test_eigen_cam_on_a_cnn_feature_map() -> None:
    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 32, stride=32), torch.nn.ReLU())
    model = torch.nn.Sequential(
        features, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2)
    ).eval()
    x = torch.zeros(1, 3, 224, 224)
    x[0, :, 64:128, 128:160] = 3.0  # cells rows 2-3, column 4 of the 7 x 7 map
    result = eigen_cam(model, x, CamTarget(features, (7, 7), prefix_tokens=0, layout="NCHW"))
    centres = result.maps[0, 16::32, 16::32]
    hot = np.zeros((7, 7), bool)
    hot[2:4, 4] = True
    assert centres[hot].min() > 0.9 and centres[~hot].max() < 0.1
    with pytest.raises(ValueError, match="no prefix tokens"):
        CamTarget(features, (7, 7), prefix_tokens=1, layout="NCHW")
    with pytest.raises(ValueError, match="feature map of shape"):
        eigen_cam(model, x, CamTarget(features, (14, 14), prefix_tokens=0, layout="NCHW"))
    assert _hooks(features) == 0


def test_eigen_cam_removes_its_hooks_when_the_forward_fails() -> None:
    model = _timm_vit()
    good = timm_vit_target(model)
    wrong_grid = CamTarget(good.layer, (16, 16), prefix_tokens=1)
    with pytest.raises(ValueError, match="patch tokens"):
        eigen_cam(model, torch.zeros(1, 3, 224, 224), wrong_grid)
    assert _hooks(good.layer) == 0
    stray = CamTarget(torch.nn.LayerNorm(64), (14, 14))
    with pytest.raises(ValueError, match="did not run"):
        eigen_cam(model, torch.zeros(1, 3, 224, 224), stray)
    assert _hooks(stray.layer) == 0
    with pytest.raises(ValueError, match="expected"):
        eigen_cam(model, torch.zeros(3, 224, 224), good)


def test_predictor_explains_with_its_own_settings_beside_concurrent_predictions() -> None:
    """A prediction running on another thread must not feed the Eigen-CAM hook its activations."""
    predictor = Predictor(_timm_vit(), get_task("ventriculomegaly"), device="cpu", bf16="off")
    predictor.model.head = torch.nn.Linear(64, 2)  # the task's two logits
    x = _hot_inputs()
    target = timm_vit_target(predictor.model)
    alone = predictor.explain(x, target)
    np.testing.assert_allclose(
        probabilities(alone.logits, "softmax"), predictor.predict(x), atol=1e-6
    )
    noise = np.random.default_rng(0).normal(0, 1, (4, 3, 224, 224)).astype(np.float32)
    stop = threading.Event()

    def predict_until_stopped() -> None:
        while not stop.is_set():
            predictor.predict(noise)

    worker = threading.Thread(target=predict_until_stopped)
    worker.start()
    try:
        for _ in range(3):
            busy = predictor.explain(x, target)
            np.testing.assert_allclose(busy.maps, alone.maps, atol=1e-5)
    finally:
        stop.set()
        worker.join(30)
    assert _hooks(target.layer) == 0


def _grad_cam_reference(model: torch.nn.Module, x: torch.Tensor, target: CamTarget) -> np.ndarray:
    """grad-cam's own EigenCAM class, with the sign correction applied where we apply it."""
    from pytorch_grad_cam import EigenCAM

    class Oriented(EigenCAM):  # type: ignore[misc]
        def get_cam_image(self, *args: object, **kwargs: object) -> np.ndarray:
            projections = np.asarray(super().get_cam_image(*args, **kwargs), dtype=np.float32)
            for projection in projections:
                if abs(float(projection.min())) > abs(float(projection.max())):
                    np.negative(projection, out=projection)
            return projections

    reshape = functools.partial(
        tokens_to_grid, grid=target.grid, prefix_tokens=target.prefix_tokens, layout=target.layout
    )
    cam = Oriented(model=model, target_layers=[target.layer], reshape_transform=reshape)
    try:
        with torch.inference_mode():
            return np.asarray(cam(input_tensor=x, targets=[]), dtype=np.float32)
    finally:
        cam.activations_and_grads.release()


def test_maps_equal_grad_cams_eigen_cam() -> None:
    """Our capture + grad-cam's projection and scaling = grad-cam's EigenCAM class, on frames
    with no planted structure (random inputs: every SVD sign and scaling path is exercised)."""
    model = _timm_vit()
    target = timm_vit_target(model)
    x = torch.as_tensor(
        np.random.default_rng(1).normal(0, 1, (3, 3, 224, 224)), dtype=torch.float32
    )
    ours = eigen_cam(model, x, target).maps
    np.testing.assert_allclose(
        ours, np.clip(_grad_cam_reference(model, x, target), 0, 1), atol=1e-5
    )


@pytest.mark.parametrize("shape", [(2, 768, 14, 14), (1, 2048, 7, 7), (1, 64, 16, 16)])
def test_first_component_is_grad_cams_projection_up_to_its_sign(shape: tuple[int, ...]) -> None:
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    rng = np.random.default_rng(sum(shape))
    activations = rng.normal(0, 1, shape).astype(np.float32)
    activations[:, :8, 2:4, 3:5] += 3.0  # a salient region, so the top component is distinct
    ours, reference = first_component(activations), get_2d_projection(activations)
    for mine, theirs in zip(ours, reference, strict=True):
        sign = np.sign(float((mine * theirs).sum()))
        np.testing.assert_allclose(sign * mine, theirs, atol=1e-4 * np.abs(theirs).max())


def test_batched_activations_explain_each_frame_as_a_pass_of_its_own() -> None:
    """The daemon's path: probabilities and activations of frames from two callers share one
    batch; each frame's map from its row equals explaining it alone."""
    model = _timm_vit()
    model.head = torch.nn.Linear(64, 2)
    target = timm_vit_target(model)
    task = get_task("ventriculomegaly")
    with pytest.raises(ValueError, match="no cam_target"):
        Predictor(model, task, device="cpu", bf16="off").predict_with_activations(
            np.zeros((1, 3, 224, 224), np.float32)
        )
    predictor = Predictor(model, task, device="cpu", bf16="off", cam_target=target)
    x = _hot_inputs().numpy()
    fn = predictor.predict_with_activations
    with Batcher(fn, item_shape=(3, 224, 224), max_batch=2, max_wait_ms=2000) as batcher:
        first, second = batcher.submit(x[:1]), batcher.submit(x[1:])
        rows = np.concatenate([first.result(30), second.result(30)])
        assert batcher.stats.batches == 1
    assert rows.dtype.names == FRAME_ROW_FIELDS
    alone = predictor.explain(x, target)
    np.testing.assert_allclose(rows["probabilities"], predictor.predict(x), atol=1e-5)
    np.testing.assert_allclose(cam_maps(rows["activations"], (224, 224)), alone.maps, atol=1e-5)
    with pytest.raises(ValueError, match="expected"):
        cam_maps(rows["activations"][0], (224, 224))
    assert _hooks(target.layer) == 1  # the predictor's own tap; explain's hook is gone


# --- back on the original frame ------------------------------------------------------------------
GEOMETRIES = [
    pytest.param(GridMapping.squash(300, 500, 224), id="squash-usf-mae"),
    pytest.param(GridMapping.pad_to_square(300, 500, 224), id="pad-fetalclip-wide"),
    pytest.param(GridMapping.pad_to_square(451, 240, 224), id="pad-fetalclip-tall-odd"),
]


def _ramp(size: int, axis: int) -> np.ndarray:
    """Each cell holds its centre's coordinate along ``axis``, as a fraction of the grid."""
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.tile(centres, (size, 1)) if axis == 0 else np.tile(centres[:, None], (1, size))


@pytest.mark.parametrize("mapping", GEOMETRIES)
@pytest.mark.parametrize("grid", [224, 14])
def test_to_frame_inverts_the_preprocessing_geometry(mapping: GridMapping, grid: int) -> None:
    """Bilinear resampling keeps a linear ramp exact, so each original pixel must read back the
    model-grid position its centre was sent to (away from the clamped borders)."""
    ys, xs = np.mgrid[0 : mapping.height, 0 : mapping.width] + 0.5
    # to_model is plain arithmetic, so it maps whole coordinate arrays at once.
    us, vs = (np.asarray(c, dtype=np.float64) for c in mapping.to_model(xs, ys))
    low, high = mapping.size / grid / 2.0, mapping.size - mapping.size / grid / 2.0
    inside = (us > low) & (us < high) & (vs > low) & (vs < high)
    assert inside.mean() > 0.5
    for axis, expected in ((0, us), (1, vs)):
        back = to_frame(_ramp(grid, axis), mapping)
        assert back.shape == (mapping.height, mapping.width) and back.dtype == np.float32
        np.testing.assert_allclose(back[inside], expected[inside] / mapping.size, atol=2e-4)


@pytest.mark.parametrize("mapping", GEOMETRIES)
def test_to_frame_on_the_model_grid_is_the_mappings_inverse(mapping: GridMapping) -> None:
    cam = np.random.default_rng(0).random((224, 224)).astype(np.float32)
    np.testing.assert_array_equal(to_frame(cam, mapping), mapping.inverse(cam))


def test_to_frame_validates_the_map() -> None:
    mapping = GridMapping.squash(10, 20, 224)
    with pytest.raises(ValueError, match="shape"):
        to_frame(np.zeros((1, 14, 14), np.float32), mapping)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_frame(np.full((14, 14), 1.5, np.float32), mapping)
    with pytest.raises(ValueError, match="NaN"):
        to_frame(np.full((14, 14), np.nan, np.float32), mapping)


@pytest.mark.parametrize("family", ["usf-mae", "fetalclip"])
def test_heat_map_lands_on_the_bright_structure_of_the_original_frame(family: str) -> None:
    """Frame → preprocess → Eigen-CAM → to_frame: the hot pixels are the structure's pixels."""
    height, width = 360, 640
    frame = np.zeros((height, width, 3), np.uint8)
    top, bottom, left, right = 120, 220, 380, 520
    frame[top:bottom, left:right] = 230
    if family == "usf-mae":
        spec, model = USF_MAE, _timm_vit()
        target = timm_vit_target(model)
    else:
        spec, model = FETALCLIP, _open_clip_vit()
        target = open_clip_target(model)
    x = preprocess_batch([frame], spec)
    cam = eigen_cam(model, x, target).maps[0]
    mapping = spec.to_model_grid(height, width)
    on_frame = to_frame(cam, mapping)
    assert on_frame.shape == (height, width)
    # One patch of slack around the structure, measured in original pixels.
    slack = int(np.ceil(target_patch(target) / min(mapping.scale)))
    inner = on_frame[top + slack : bottom - slack, left + slack : right - slack]
    outside = np.ones((height, width), bool)
    outside[max(top - slack, 0) : bottom + slack, max(left - slack, 0) : right + slack] = False
    assert inner.mean() > 0.8, inner.mean()
    assert on_frame[outside].max() < 0.1
    peak = np.unravel_index(int(np.argmax(on_frame)), on_frame.shape)
    assert top <= peak[0] < bottom and left <= peak[1] < right


def target_patch(target: CamTarget) -> float:
    """Model-grid pixels per patch token."""
    return 224 / target.grid[0]
