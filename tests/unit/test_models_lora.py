"""FetalCLIP + LoRA: open_clip's own attention equals nn.MultiheadAttention, and with it every
adapter — out_proj's included — takes part in the forward pass and receives gradient."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import LayerNorm, VisionTransformer
from torch import nn

from pipelines.errors import ModelLoadError
from pipelines.models import (
    FETALCLIP_LORA,
    LoraSettings,
    apply_lora,
    build_task_model,
    create_encoder,
    get_encoder_card,
)
from pipelines.models.lora import lora_layers

TINY = dict(get_encoder_card("fetalclip-vit-l14").tiny_overrides)


def _mha_tower() -> nn.Module:
    """open_clip's default tower: blocks built on nn.MultiheadAttention."""
    return VisionTransformer(
        image_size=224,
        patch_size=14,
        width=TINY["width"],
        layers=TINY["layers"],
        heads=TINY["heads"],
        mlp_ratio=4.0,
        output_dim=TINY["embed_dim"],
        act_layer=nn.GELU,
        norm_layer=LayerNorm,
    )


def test_custom_attention_equals_multihead_attention() -> None:
    torch.manual_seed(0)
    reference = _mha_tower().eval()
    assert isinstance(reference.transformer.resblocks[0].attn, nn.MultiheadAttention)
    ours = create_encoder("fetalclip-vit-l14", **TINY).eval()
    assert not isinstance(ours.transformer.resblocks[0].attn, nn.MultiheadAttention)
    ours.load_state_dict(reference.state_dict(), strict=True)  # same names, same shapes
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert torch.allclose(expected, got, atol=1e-5, rtol=1e-5)
    assert not torch.equal(expected[0], expected[1])


def _loss(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    logits = model(torch.randn(2, 3, 224, 224))
    return nn.functional.binary_cross_entropy_with_logits(logits[:, 0], torch.tensor([0.0, 1.0]))


def test_every_lora_adapter_gets_gradient_out_proj_included() -> None:
    torch.manual_seed(0)
    model = build_task_model(
        "image_quality", "fetalclip-vit-l14", overrides=TINY, lora=FETALCLIP_LORA
    )
    model.train()
    layers = dict(lora_layers(model.encoder))
    per_block = {name.split(".", 3)[-1] for name in layers}  # transformer.resblocks.N.
    assert per_block == {"attn.out_proj", "mlp.c_fc", "mlp.c_proj"}
    assert len(layers) == 3 * TINY["layers"]
    _loss(model).backward()
    for name, layer in layers.items():
        grad = layer.lora_B["default"].weight.grad  # B starts at zero: A's gradient is zero
        assert grad is not None and grad.abs().sum() > 0, name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("head.") for n in trainable)
    assert {"head.weight", "head.bias"} <= trainable
    for name, param in model.encoder.named_parameters():
        if "lora_" not in name:
            assert param.grad is None, name


def test_lora_on_multihead_attention_out_proj_gets_no_gradient() -> None:
    """Why the tower is built with open_clip's own attention: the control case."""
    tower = apply_lora(_mha_tower(), FETALCLIP_LORA)
    head = nn.Linear(TINY["embed_dim"], 1)
    _loss(nn.Sequential(tower, head)).backward()
    grads = {name: layer.lora_B["default"].weight.grad for name, layer in lora_layers(tower)}
    assert all(g is None for n, g in grads.items() if n.endswith("out_proj"))
    assert all(g is not None for n, g in grads.items() if n.endswith("c_fc"))


def test_merged_adapters_compute_the_same_function() -> None:
    torch.manual_seed(0)
    model = build_task_model(
        "image_quality", "fetalclip-vit-l14", overrides=TINY, lora=FETALCLIP_LORA
    )
    for _name, layer in lora_layers(model.encoder):
        nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    model.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before = model(x)
        model.merge_lora()
        after = model(x)
    assert not list(lora_layers(model.encoder))
    assert torch.allclose(before, after, atol=1e-5)
    assert isinstance(model.target_layer, nn.LayerNorm)


def test_lora_target_typo_is_refused() -> None:
    encoder = create_encoder("fetalclip-vit-l14", **TINY)
    with pytest.raises(ModelLoadError, match="\\['outproj'\\] match no linear layer"):
        apply_lora(encoder, LoraSettings(targets=("c_fc", "outproj")))
    with pytest.raises(ModelLoadError, match="r=0"):
        LoraSettings(r=0)
