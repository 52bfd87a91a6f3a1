"""``models.compile``: a Predictor running its model through ``torch.compile`` gives the eager
model's probabilities and Eigen-CAM activations, compiles only while warming up, and still
explains any other layer (on the eager model). Invokes inductor, hence gcc: seconds, not ms."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch._dynamo.utils import counters

from pipelines.explain import CamTarget, cam_maps, timm_vit_target
from pipelines.infer import Predictor
from pipelines.tasks import get_task

pytestmark = pytest.mark.integration


def _tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=2
    )
    return model.eval()


def _predictor(model: VisionTransformer, compiled: bool) -> Predictor:
    return Predictor(
        model,
        get_task("ventriculomegaly"),
        device="cpu",
        bf16="off",
        cam_target=timm_vit_target(model),
        compiled=compiled,
    )


def test_compiled_predictor_matches_eager_and_compiles_only_while_warming_up() -> None:
    model = _tiny_vit()
    eager = _predictor(copy.deepcopy(model), compiled=False)
    compiled = _predictor(model, compiled=True)
    compiled.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    rng = np.random.default_rng(3)
    for size in (4, 1, 5, 4, 16):
        x = rng.normal(0, 1, (size, 3, 224, 224)).astype(np.float32)
        ours, reference = compiled.predict_with_activations(x), eager.predict_with_activations(x)
        np.testing.assert_allclose(ours["probabilities"], reference["probabilities"], atol=1e-4)
        np.testing.assert_allclose(ours["activations"], reference["activations"], atol=1e-3)
        assert ours["activations"].shape == (size, 64, 14, 14)
    assert counters["stats"]["unique_graphs"] == graphs, "a batch size recompiled after warm-up"
    # Another layer is explained on the eager model, with a hook of its own removed after.
    first = CamTarget(model.blocks[0].norm1, (14, 14))
    x = rng.normal(0, 1, (2, 3, 224, 224)).astype(np.float32)
    result = compiled.explain(x, first)
    np.testing.assert_allclose(
        result.maps,
        eager.explain(x, CamTarget(eager.model.blocks[0].norm1, (14, 14))).maps,
        atol=1e-4,
    )
    assert len(model.blocks[0].norm1._forward_hooks) == 0
    rows = compiled.predict_with_activations(x)
    np.testing.assert_allclose(
        cam_maps(rows["activations"], (224, 224)),
        eager.explain(x, timm_vit_target(eager.model)).maps,
        atol=1e-3,
    )
