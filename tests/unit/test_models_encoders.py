"""Encoder registry: every registered encoder builds, runs, exposes its card's layer and grid,
round-trips a checkpoint in its own published layout, and refuses one that does not fit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pipelines.errors import ModelLoadError
from pipelines.models import (
    EncoderCard,
    create_encoder,
    get_encoder_card,
    list_encoders,
    resolve_layer,
)
from pipelines.preprocess import get_spec

CARDS = list_encoders()
IDS = [c.name for c in CARDS]

#: How each encoder's published checkpoint wraps the encoder's own state_dict (DESIGN.md §3).
#: A newly registered encoder must say how its weights are published: the test below fails
#: until it is listed here.
PUBLISHED_LAYOUT: dict[str, Callable[[dict[str, torch.Tensor]], Any]] = {
    # USF-MAE: the flat state_dict of the whole MAE (here with a decoder key it must drop).
    "usf-mae-vit-b16": lambda sd: {**sd, "mask_token": torch.zeros(1, 1, 8)},
    # FetalCLIP: open_clip training checkpoint, DDP prefix, text tower beside the visual one.
    "fetalclip-vit-l14": lambda sd: {
        "epoch": 7,
        "state_dict": {
            **{f"module.visual.{k}": v for k, v in sd.items()},
            "module.logit_scale": torch.tensor(4.6),
            "module.token_embedding.weight": torch.zeros(10, 4),
        },
    },
    # timm files keep their ImageNet classifier.
    "resnet50": lambda sd: {
        **sd,
        "fc.weight": torch.zeros(1000, 2048),
        "fc.bias": torch.zeros(1000),
    },
    "vgg19": lambda sd: {
        **sd,
        "head.fc.weight": torch.zeros(1000, 4096),
        "head.fc.bias": torch.zeros(1000),
    },
    "vit-b16-imagenet": lambda sd: {
        **sd,
        "head.weight": torch.zeros(1000, 64),
        "head.bias": torch.zeros(1000),
    },
}


def test_builtin_encoders_registered() -> None:
    assert set(IDS) == {
        "usf-mae-vit-b16",
        "fetalclip-vit-l14",
        "resnet50",
        "vgg19",
        "vit-b16-imagenet",
    }
    assert set(PUBLISHED_LAYOUT) == set(IDS), "every encoder needs its published layout here"


def _tiny(card: EncoderCard) -> nn.Module:
    torch.manual_seed(0)
    return create_encoder(card.name, **card.tiny_overrides).eval()


@pytest.mark.parametrize("card", CARDS, ids=IDS)
def test_card_is_consistent(card: EncoderCard) -> None:
    spec = get_spec(card.preprocessing)
    assert spec.size == card.input_size == 224
    assert card.embed_dim > 0
    if card.layout == "tokens":
        assert card.grid == (224 // card.patch_size,) * 2  # type: ignore[operator]
        assert card.num_prefix_tokens == 1
    else:
        assert card.grid is None and card.num_prefix_tokens == 0


@pytest.mark.parametrize("card", CARDS, ids=IDS)
def test_tiny_variant_runs_and_exposes_target_layer(card: EncoderCard) -> None:
    encoder = _tiny(card)
    resolved = card.resolved(encoder)
    seen: list[torch.Tensor] = []
    layer = resolved.get_target_layer(encoder)
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        features = encoder(torch.randn(2, 3, resolved.input_size, resolved.input_size))
    handle.remove()
    assert features.shape == (2, resolved.embed_dim)
    assert torch.isfinite(features).all()
    (activation,) = seen
    if resolved.layout == "tokens":
        rows, cols = resolved.grid  # type: ignore[misc]
        assert activation.shape[:2] == (2, resolved.num_prefix_tokens + rows * cols)
    else:
        assert activation.ndim == 4 and activation.shape[0] == 2


@pytest.mark.parametrize("card", CARDS, ids=IDS)
def test_published_layout_round_trip(card: EncoderCard, tmp_path: Path) -> None:
    source = _tiny(card)
    path = tmp_path / "weights.pt"
    torch.save(PUBLISHED_LAYOUT[card.name](source.state_dict()), path)
    loaded = create_encoder(card.name, checkpoint=path, **card.tiny_overrides).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))


@pytest.mark.parametrize("card", CARDS, ids=IDS)
def test_mismatching_checkpoint_is_refused_with_keys_named(
    card: EncoderCard, tmp_path: Path
) -> None:
    state = dict(_tiny(card).state_dict())
    names = list(state)
    dropped, reshaped = names[0], names[-1]
    del state[dropped]
    state[reshaped] = torch.zeros(*state[reshaped].shape, 2)
    state["stray.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pt"
    torch.save(PUBLISHED_LAYOUT[card.name](state), path)
    with pytest.raises(ModelLoadError) as info:
        create_encoder(card.name, checkpoint=path, **card.tiny_overrides)
    error = info.value
    assert error.missing == (dropped,)
    assert error.unexpected == ("stray.weight",)
    assert [m[0] for m in error.mismatched] == [reshaped]
    message = str(error)
    for key in (dropped, "stray.weight", reshaped, str(path), card.name):
        assert key in message


def test_full_size_checkpoint_refused_for_tiny_build(tmp_path: Path) -> None:
    """Shape mismatches everywhere: the message stays short and says how many more."""
    card = get_encoder_card("usf-mae-vit-b16")
    state = _tiny(card).state_dict()
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError) as info:
        create_encoder("usf-mae-vit-b16", checkpoint=path, embed_dim=32, depth=2, num_heads=2)
    assert len(info.value.mismatched) == len(state)
    assert f"... and {len(state) - ModelLoadError.SHOWN} more" in str(info.value)
    assert len(str(info.value)) < 2000


def test_unknown_name_and_override_fail_closed(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown encoder 'vit-huge'.*usf-mae-vit-b16"):
        create_encoder("vit-huge")
    with pytest.raises(ModelLoadError, match="no override \\['num_classes'\\]"):
        create_encoder("usf-mae-vit-b16", num_classes=5)
    with pytest.raises(ModelLoadError, match="cannot be built"):
        create_encoder("usf-mae-vit-b16", embed_dim=63, depth=1, num_heads=2)
    with pytest.raises(ModelLoadError, match="does not exist"):
        create_encoder("resnet50", checkpoint=tmp_path / "absent.pt")


def test_not_a_state_dict_and_unsafe_pickles_refused(tmp_path: Path) -> None:
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(ModelLoadError, match="expected a state_dict"):
        create_encoder("resnet50", checkpoint=listing, layers=[1, 1, 1, 1])
    code = tmp_path / "code.pt"
    torch.save({"model": nn.Linear(2, 2)}, code)  # a pickled module: code, not weights
    with pytest.raises(ModelLoadError, match="cannot be read as weights"):
        create_encoder("resnet50", checkpoint=code)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot be read"):
        create_encoder("resnet50", checkpoint=garbage)


def test_non_finite_weights_refused(tmp_path: Path) -> None:
    card = get_encoder_card("vit-b16-imagenet")
    state = dict(_tiny(card).state_dict())
    state["norm.weight"] = state["norm.weight"].clone()
    state["norm.weight"][3] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match="non-finite.*norm.weight"):
        create_encoder(card.name, checkpoint=path, **card.tiny_overrides)


def test_safetensors_files_load(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    card = get_encoder_card("resnet50")
    source = _tiny(card)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = create_encoder("resnet50", checkpoint=path, **card.tiny_overrides).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))


def test_resolve_layer_paths() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.LayerNorm(2)))
    assert resolve_layer(nn.ModuleDict({"blocks": model}), "blocks[-1][1]") is model[1][1]
    with pytest.raises(ValueError, match="does not exist"):
        resolve_layer(nn.ModuleDict({"blocks": model}), "blocks[5]")
    with pytest.raises(ValueError, match="not a module"):
        resolve_layer(nn.Linear(2, 2), "weight")
    with pytest.raises(ValueError, match="attribute path"):
        EncoderCard(
            name="x",
            architecture="x",
            builder=nn.Identity,
            checkpoint_filter_fn=dict,
            embed_dim=1,
            input_size=224,
            preprocessing="usf-mae",
            target_layer="blocks[-1](0)",
            layout="feature_map",
        )


def test_partly_expanded_weights_are_checked_whole(tmp_path: Path) -> None:
    """A zero-stride view with a NaN in its real dimension is still caught."""
    card = get_encoder_card("vit-b16-imagenet")
    state = dict(_tiny(card).state_dict())
    column = torch.randn(64, 1)
    column[5, 0] = float("inf")
    state["blocks.0.attn.proj.weight"] = column.expand(64, 64)
    path = tmp_path / "inf.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match="non-finite.*blocks.0.attn.proj.weight"):
        create_encoder(card.name, checkpoint=path, **card.tiny_overrides)
