"""Published checkpoint layouts at full size (DESIGN.md §3), written here key by key.

The layouts are spelled out from the upstream code (Facebook MAE ``models_mae.py``, open_clip
``CLIP``), not derived from the models we build, so a drift in either side fails. USF-MAE gets
random values; FetalCLIP (427M tensors with its text tower) gets one distinct constant per key,
stored as expanded 1-element tensors, which proves each key lands on its own parameter without
writing 1.7 GB.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from pipelines.errors import ModelLoadError
from pipelines.models import create_encoder

Layout = dict[str, tuple[int, ...]]


def _vit_blocks(prefix: str, depth: int, dim: int, mlp: int) -> Layout:
    """timm/Facebook-MAE ViT blocks (``models_mae.py`` uses timm's ``Block``)."""
    layout: Layout = {}
    for i in range(depth):
        p = f"{prefix}{i}."
        layout |= {
            p + "norm1.weight": (dim,),
            p + "norm1.bias": (dim,),
            p + "attn.qkv.weight": (3 * dim, dim),
            p + "attn.qkv.bias": (3 * dim,),
            p + "attn.proj.weight": (dim, dim),
            p + "attn.proj.bias": (dim,),
            p + "norm2.weight": (dim,),
            p + "norm2.bias": (dim,),
            p + "mlp.fc1.weight": (mlp, dim),
            p + "mlp.fc1.bias": (mlp,),
            p + "mlp.fc2.weight": (dim, mlp),
            p + "mlp.fc2.bias": (dim,),
        }
    return layout


def mae_vit_base_layout() -> tuple[Layout, Layout]:
    """``mae_vit_base_patch16_dec512d8b``: (encoder keys, decoder keys)."""
    encoder: Layout = {
        "cls_token": (1, 1, 768),
        "pos_embed": (1, 197, 768),
        "patch_embed.proj.weight": (768, 3, 16, 16),
        "patch_embed.proj.bias": (768,),
        **_vit_blocks("blocks.", 12, 768, 3072),
        "norm.weight": (768,),
        "norm.bias": (768,),
    }
    decoder: Layout = {
        "mask_token": (1, 1, 512),
        "decoder_embed.weight": (512, 768),
        "decoder_embed.bias": (512,),
        "decoder_pos_embed": (1, 197, 512),
        **_vit_blocks("decoder_blocks.", 8, 512, 2048),
        "decoder_norm.weight": (512,),
        "decoder_norm.bias": (512,),
        "decoder_pred.weight": (16 * 16 * 3, 512),
        "decoder_pred.bias": (16 * 16 * 3,),
    }
    return encoder, decoder


def _clip_blocks(prefix: str, depth: int, width: int) -> Layout:
    """open_clip ``ResidualAttentionBlock`` (``nn.MultiheadAttention`` parameter names)."""
    layout: Layout = {}
    for i in range(depth):
        p = f"{prefix}{i}."
        layout |= {
            p + "ln_1.weight": (width,),
            p + "ln_1.bias": (width,),
            p + "attn.in_proj_weight": (3 * width, width),
            p + "attn.in_proj_bias": (3 * width,),
            p + "attn.out_proj.weight": (width, width),
            p + "attn.out_proj.bias": (width,),
            p + "ln_2.weight": (width,),
            p + "ln_2.bias": (width,),
            p + "mlp.c_fc.weight": (4 * width, width),
            p + "mlp.c_fc.bias": (4 * width,),
            p + "mlp.c_proj.weight": (width, 4 * width),
            p + "mlp.c_proj.bias": (width,),
        }
    return layout


def fetalclip_layout() -> tuple[Layout, Layout]:
    """FetalCLIP's open_clip CLIP: (``visual.*`` keys, everything else)."""
    visual: Layout = {
        "visual.class_embedding": (1024,),
        "visual.positional_embedding": ((224 // 14) ** 2 + 1, 1024),
        "visual.proj": (1024, 768),
        "visual.conv1.weight": (1024, 3, 14, 14),
        "visual.ln_pre.weight": (1024,),
        "visual.ln_pre.bias": (1024,),
        **_clip_blocks("visual.transformer.resblocks.", 24, 1024),
        "visual.ln_post.weight": (1024,),
        "visual.ln_post.bias": (1024,),
    }
    text: Layout = {
        "positional_embedding": (117, 768),
        "text_projection": (768, 768),
        "logit_scale": (),
        "token_embedding.weight": (49408, 768),
        **_clip_blocks("transformer.resblocks.", 12, 768),
        "ln_final.weight": (768,),
        "ln_final.bias": (768,),
    }
    return visual, text


def constants(layout: Layout, start: int = 0) -> dict[str, torch.Tensor]:
    """Key i → the constant ``start + i``, as a zero-stride view of one element."""
    return {
        key: torch.full((1,), float(start + i)).reshape(()).expand(shape)
        for i, (key, shape) in enumerate(layout.items())
    }


def test_layouts_have_the_published_tensor_counts() -> None:
    encoder, decoder = mae_vit_base_layout()
    assert (len(encoder), len(encoder) + len(decoder)) == (150, 254)
    visual, _text = fetalclip_layout()
    assert sum(torch.Size(s).numel() for s in visual.values()) == pytest.approx(304e6, rel=0.01)


@pytest.fixture(scope="module")
def usf_mae_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    encoder, decoder = mae_vit_base_layout()
    generator = torch.Generator().manual_seed(1)
    state = {
        k: torch.randn(s, generator=generator) * 0.02 for k, s in {**encoder, **decoder}.items()
    }
    path = tmp_path_factory.mktemp("usf") / "USF-MAE_full_pretrain_43dataset_100epochs.pt"
    torch.save(state, path)
    return path, state


def test_usf_mae_flat_state_dict_loads_encoder_exactly(
    usf_mae_file: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, state = usf_mae_file
    assert len(torch.load(path, weights_only=True, mmap=True)) == 254
    encoder = create_encoder("usf-mae-vit-b16", checkpoint=path)
    loaded = encoder.state_dict()
    assert len(loaded) == 150
    assert sum(p.numel() for p in encoder.parameters()) == pytest.approx(85.8e6, rel=0.01)
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    assert encoder.norm.eps == 1e-6  # type: ignore[union-attr]
    with torch.no_grad():
        out = encoder.eval()(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 768)


def test_facebook_mae_model_wrapper_with_args(tmp_path: Path) -> None:
    encoder, decoder = mae_vit_base_layout()
    checkpoint = {
        "model": constants({**encoder, **decoder}),
        "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": [0, 1]}]},
        "epoch": 99,
        "args": argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75),
    }
    path = tmp_path / "checkpoint-99.pth"
    torch.save(checkpoint, path)
    model = create_encoder("usf-mae-vit-b16", checkpoint=path)
    loaded = model.state_dict()
    for i, key in enumerate(encoder):
        assert bool((loaded[key] == float(i)).all()), key


def test_fetalclip_open_clip_checkpoint_full_size(tmp_path: Path) -> None:
    visual, text = fetalclip_layout()
    state = constants({**visual, **text})
    path = tmp_path / "FetalCLIP_weights.pt"
    torch.save({"epoch": 20, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    tower = create_encoder("fetalclip-vit-l14", checkpoint=path)
    loaded = tower.state_dict()
    assert set(loaded) == {k[len("visual.") :] for k in visual}
    for i, key in enumerate(visual):
        assert bool((loaded[key[len("visual.") :]] == float(i)).all()), key


def test_fetalclip_checkpoint_missing_a_block_is_refused(tmp_path: Path) -> None:
    visual, text = fetalclip_layout()
    state = constants({**visual, **text})
    for key in [k for k in state if k.startswith("visual.transformer.resblocks.23.")]:
        del state[key]
    state["visual.proj"] = torch.zeros(1024, 512)  # a ViT-L/14 with a 512-d CLIP embedding
    path = tmp_path / "other_clip.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ModelLoadError) as info:
        create_encoder("fetalclip-vit-l14", checkpoint=path)
    assert len(info.value.missing) == 12
    assert all(k.startswith("transformer.resblocks.23.") for k in info.value.missing)
    assert info.value.mismatched == (("proj", (1024, 512), (1024, 768)),)
    assert "transformer.resblocks.23.ln_1.weight" in str(info.value)


def test_text_only_checkpoint_is_refused(tmp_path: Path) -> None:
    _visual, text = fetalclip_layout()
    path = tmp_path / "text.pt"
    torch.save({"state_dict": constants(text)}, path)
    with pytest.raises(ModelLoadError, match="no 'visual.\\*' keys"):
        create_encoder("fetalclip-vit-l14", checkpoint=path)


def test_fine_tuned_mae_with_avg_pool_is_refused(tmp_path: Path) -> None:
    """A Facebook MAE fine-tuned checkpoint (global-avg pool: fc_norm, no norm) is another model."""
    encoder, _decoder = mae_vit_base_layout()
    layout = {k: s for k, s in encoder.items() if not k.startswith("norm.")}
    layout |= {"fc_norm.weight": (768,), "fc_norm.bias": (768,), "head.weight": (1000, 768)}
    path = tmp_path / "mae_finetuned_vit_base.pth"
    torch.save({"model": constants(layout)}, path)
    with pytest.raises(ModelLoadError) as info:
        create_encoder("usf-mae-vit-b16", checkpoint=path)
    assert info.value.missing == ("norm.weight", "norm.bias")
    assert info.value.unexpected == ("fc_norm.weight", "fc_norm.bias")


@pytest.mark.parametrize(
    ("name", "timm_name", "classifier"),
    [
        ("resnet50", "resnet50", "fc."),
        ("vgg19", "vgg19", "head.fc."),
        ("vit-b16-imagenet", "vit_base_patch16_224", "head."),
    ],
)
def test_timm_imagenet_files_full_size(
    name: str, timm_name: str, classifier: str, tmp_path: Path
) -> None:
    """A timm hub file is the timm model's state_dict, ImageNet classifier included."""
    import timm

    with torch.device("meta"):
        reference = timm.create_model(timm_name, pretrained=False, num_classes=1000)
    layout = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert any(k.startswith(classifier) for k in layout)
    path = tmp_path / "pytorch_model.bin"
    torch.save(constants(layout), path)
    loaded = create_encoder(name, checkpoint=path).state_dict()
    kept = [k for k in layout if not k.startswith(classifier)]
    assert sorted(loaded) == sorted(kept)
    for i, key in enumerate(layout):
        if key in loaded:
            assert bool((loaded[key] == float(i)).all()), key
