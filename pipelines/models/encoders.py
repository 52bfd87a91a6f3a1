"""The built-in encoders (DESIGN.md §3): the two ultrasound foundation models and three baselines.

Each builder reproduces the upstream architecture exactly, so that the published weights load
with ``strict=True``; the card beside it says how to feed it, where Eigen-CAM looks, and which
``checkpoint_filter_fn`` maps the published file.
"""

from __future__ import annotations

import inspect
from typing import Any

import timm
from open_clip.transformer import LayerNorm as OpenClipLayerNorm
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from timm.models.vgg import VGG, cfgs
from torch import nn

from pipelines.errors import ModelLoadError
from pipelines.models.checkpoints import filter_open_clip_visual, filter_usf_mae, timm_filter
from pipelines.models.registry import EncoderCard, register_encoder

_VIT_OVERRIDES = frozenset(
    {"embed_dim", "depth", "num_heads", "mlp_ratio", "img_size", "patch_size", "drop_path_rate"}
)
_TINY_VIT = {"embed_dim": 64, "depth": 2, "num_heads": 2}


def build_timm_vit_b16(**overrides: Any) -> nn.Module:
    """timm ``vit_base_patch16_224`` as a feature extractor: CLS-token pooling, no classifier.

    timm's defaults are exactly Facebook MAE's encoder (qkv bias, LayerNorm eps 1e-6, CLS token,
    final ``norm``), so USF-MAE's 150 encoder tensors load into it by name.
    """
    return timm.create_model(
        "vit_base_patch16_224", pretrained=False, num_classes=0, global_pool="token", **overrides
    )


def _inspect_timm_vit(module: nn.Module) -> dict[str, Any]:
    patch: Any = module.patch_embed
    return {
        "embed_dim": int(module.num_features),  # type: ignore[arg-type]
        "input_size": int(patch.img_size[0]),
        "patch_size": int(patch.patch_size[0]),
        "num_prefix_tokens": int(module.num_prefix_tokens),  # type: ignore[arg-type]
    }


def build_fetalclip_visual(
    *,
    embed_dim: int = 768,
    width: int = 1024,
    layers: int = 24,
    heads: int | None = None,
    patch_size: int = 14,
    image_size: int = 224,
    mlp_ratio: float = 4.0,
) -> nn.Module:
    """FetalCLIP's vision tower: open_clip ViT-L/14, plain GELU, projected to ``embed_dim``.

    Built with open_clip's own attention (``block_type="custom"``) rather than
    ``nn.MultiheadAttention``: that module passes ``out_proj.weight`` straight to
    ``F.multi_head_attention_forward``, so a LoRA adapter on ``out_proj`` would never run. The
    custom block has the same parameters under the same names (``attn.in_proj_weight``,
    ``attn.out_proj.*``) and computes the same function, calling ``out_proj`` as a module.
    """
    if "block_type" not in inspect.signature(OpenClipVisionTransformer).parameters:
        raise ModelLoadError(
            "the installed open_clip has no VisionTransformer(block_type=...): "
            "open_clip_torch >= 3.0 is required for FetalCLIP with LoRA on out_proj"
        )
    return OpenClipVisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        width=width,
        layers=layers,
        heads=heads if heads is not None else max(width // 64, 1),
        mlp_ratio=mlp_ratio,
        output_dim=embed_dim,
        act_layer=nn.GELU,
        norm_layer=OpenClipLayerNorm,
        block_type="custom",
    )


def _inspect_open_clip(module: nn.Module) -> dict[str, Any]:
    image_size: Any = module.image_size
    patch_size: Any = module.patch_size
    return {
        "embed_dim": int(module.output_dim),  # type: ignore[arg-type]
        "input_size": int(image_size[0]),
        "patch_size": int(patch_size[0]),
        "num_prefix_tokens": 1,
    }


def build_timm_resnet50(**overrides: Any) -> nn.Module:
    """timm ``resnet50`` without its classifier: global-average-pooled 2048 features."""
    return timm.create_model("resnet50", pretrained=False, num_classes=0, **overrides)


def build_timm_vgg19(*, cfg: list[Any] | None = None, **overrides: Any) -> nn.Module:
    """timm VGG-19 without its classifier: the 4096 features of its two-layer ``pre_logits``.

    Built from timm's ``VGG`` class with the ``vgg19`` layer list, which is what
    ``timm.create_model("vgg19")`` builds; ``cfg`` replaces that list for tiny variants.
    """
    return VGG(
        cfg=list(cfg) if cfg is not None else list(cfgs["vgg19"]), num_classes=0, **overrides
    )


def _inspect_cnn(module: nn.Module) -> dict[str, Any]:
    features: Any = getattr(module, "head_hidden_size", None) or module.num_features
    return {"embed_dim": int(features)}


USF_MAE_VIT_B16 = register_encoder(
    EncoderCard(
        name="usf-mae-vit-b16",
        architecture="timm vit_base_patch16_224 (Facebook MAE encoder)",
        builder=build_timm_vit_b16,
        checkpoint_filter_fn=filter_usf_mae,
        embed_dim=768,
        input_size=224,
        preprocessing="usf-mae",
        target_layer="blocks[-1].norm1",
        layout="tokens",
        patch_size=16,
        num_prefix_tokens=1,
        overridable=_VIT_OVERRIDES,
        tiny_overrides=_TINY_VIT,
        weights="USF-MAE_full_pretrain_43dataset_100epochs.pt: flat MAE state_dict (254 "
        "tensors, 150 encoder); Facebook MAE {'model': ...} files too",
        inspect=_inspect_timm_vit,
    )
)

FETALCLIP_VIT_L14 = register_encoder(
    EncoderCard(
        name="fetalclip-vit-l14",
        architecture="open_clip ViT-L/14 vision tower (FetalCLIP: width 1024, 24 layers, "
        "patch 14, image 224, projected to 768)",
        builder=build_fetalclip_visual,
        checkpoint_filter_fn=filter_open_clip_visual,
        embed_dim=768,
        input_size=224,
        preprocessing="fetalclip",
        target_layer="transformer.resblocks[-1].ln_1",
        layout="tokens",
        patch_size=14,
        num_prefix_tokens=1,
        overridable=frozenset(
            {"embed_dim", "width", "layers", "heads", "patch_size", "image_size", "mlp_ratio"}
        ),
        tiny_overrides={"embed_dim": 32, "width": 64, "layers": 2, "heads": 2},
        weights="FetalCLIP_weights.pt: open_clip checkpoint {'state_dict': ..., 'epoch': ...}, "
        "keys may carry 'module.'; only visual.* is used",
        inspect=_inspect_open_clip,
    )
)

RESNET50 = register_encoder(
    EncoderCard(
        name="resnet50",
        architecture="timm resnet50 (ImageNet baseline)",
        builder=build_timm_resnet50,
        checkpoint_filter_fn=timm_filter("fc"),
        embed_dim=2048,
        input_size=224,
        # The ventriculomegaly paper compares its baselines on the same inputs: ImageNet
        # statistics, nearest-neighbour squash — which is the usf-mae spec.
        preprocessing="usf-mae",
        target_layer="layer4[-1]",
        layout="feature_map",
        overridable=frozenset({"layers", "drop_path_rate"}),
        tiny_overrides={"layers": [1, 1, 1, 1]},
        weights="timm-format state_dict (.pth/.bin/.safetensors); the 'fc' classifier is dropped",
        inspect=_inspect_cnn,
    )
)

VGG19 = register_encoder(
    EncoderCard(
        name="vgg19",
        architecture="timm vgg19 (ImageNet baseline)",
        builder=build_timm_vgg19,
        checkpoint_filter_fn=timm_filter("head.fc"),
        embed_dim=4096,
        input_size=224,
        preprocessing="usf-mae",
        target_layer="features[-1]",
        layout="feature_map",
        overridable=frozenset({"cfg"}),
        tiny_overrides={"cfg": [16, "M", 16, "M", 32, "M", 32, "M", 32, "M"]},
        weights="timm-format state_dict; the 'head.fc' classifier is dropped",
        inspect=_inspect_cnn,
    )
)

VIT_B16_IMAGENET = register_encoder(
    EncoderCard(
        name="vit-b16-imagenet",
        architecture="timm vit_base_patch16_224 (ImageNet baseline)",
        builder=build_timm_vit_b16,
        checkpoint_filter_fn=timm_filter("head"),
        embed_dim=768,
        input_size=224,
        preprocessing="usf-mae",
        target_layer="blocks[-1].norm1",
        layout="tokens",
        patch_size=16,
        num_prefix_tokens=1,
        overridable=_VIT_OVERRIDES,
        tiny_overrides=_TINY_VIT,
        weights="timm-format state_dict; the 'head' classifier is dropped",
        inspect=_inspect_timm_vit,
    )
)
