"""Full-size models end to end: a USF-MAE checkpoint in its published layout → ventriculomegaly
model → usfmd model file → ``usfmd models import --activate`` (a real subprocess) → the workers'
cache serves the same logits; and FetalCLIP ViT-L/14 + LoRA at full size trains its out_proj
adapters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from daemon.config import load_settings
from daemon.db import migrate
from daemon.db.engine import Database
from daemon.models import describe, list_versions
from daemon.models.cache import ModelCache
from pipelines.models import (
    FETALCLIP_LORA,
    build_task_model,
    save_model_file,
)
from pipelines.models.lora import lora_layers

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _mae_state() -> dict[str, torch.Tensor]:
    """Facebook MAE ``mae_vit_base_patch16_dec512d8b``: all 254 tensors, random values."""
    g = torch.Generator().manual_seed(7)

    def blocks(prefix: str, depth: int, dim: int) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for i in range(depth):
            p = f"{prefix}{i}."
            for norm in ("norm1", "norm2"):
                out |= {p + norm + ".weight": (dim,), p + norm + ".bias": (dim,)}
            out |= {p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,)}
            out |= {p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,)}
            out |= {p + "mlp.fc1.weight": (4 * dim, dim), p + "mlp.fc1.bias": (4 * dim,)}
            out |= {p + "mlp.fc2.weight": (dim, 4 * dim), p + "mlp.fc2.bias": (dim,)}
        return out

    layout = {
        "cls_token": (1, 1, 768),
        "pos_embed": (1, 197, 768),
        "mask_token": (1, 1, 512),
        "decoder_pos_embed": (1, 197, 512),
        "patch_embed.proj.weight": (768, 3, 16, 16),
        "patch_embed.proj.bias": (768,),
        **blocks("blocks.", 12, 768),
        "norm.weight": (768,),
        "norm.bias": (768,),
        "decoder_embed.weight": (512, 768),
        "decoder_embed.bias": (512,),
        **blocks("decoder_blocks.", 8, 512),
        "decoder_norm.weight": (512,),
        "decoder_norm.bias": (512,),
        "decoder_pred.weight": (768, 512),
        "decoder_pred.bias": (768,),
    }
    assert len(layout) == 254
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in layout.items()}


def _usfmd(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_usf_mae_checkpoint_to_active_model_in_the_cache(db_url: str, tmp_path: Path) -> None:
    state = _mae_state()
    checkpoint = tmp_path / "USF-MAE_full_pretrain_43dataset_100epochs.pt"
    torch.save(state, checkpoint)
    torch.manual_seed(0)
    model = build_task_model("ventriculomegaly", "usf-mae-vit-b16", checkpoint=checkpoint).eval()
    encoder = model.encoder.state_dict()
    assert len(encoder) == 150 and all(torch.equal(v, state[k]) for k, v in encoder.items())
    model_file = tmp_path / "vm.pt"
    save_model_file(model_file, model, metadata={"metrics": {"f1": 0.9178}})

    data = tmp_path / "data"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("USFMD_")},
        "USFMD_STORAGE__DATA_DIR": str(data),
        "USFMD_DATABASE__URL": db_url,
    }
    settings = load_settings(
        None, storage={"data_dir": str(data)}, database={"url": db_url}, models={"device": "cpu"}
    )
    db = Database(settings.database_url)
    try:
        migrate.upgrade(db.engine)
        done = _usfmd(env, "models", "import", str(model_file), "--version", "1", "--activate")
        assert done.returncode == 0, done.stderr
        assert "activated" in done.stdout
        with db.read() as session:
            (row,) = [describe(r) for r in list_versions(session)]
        assert row["active"] and row["encoder"] == "usf-mae-vit-b16"
        loaded = ModelCache.from_settings(db, settings).get("ventriculomegaly")
    finally:
        db.dispose()
    assert loaded is not None and loaded.ref.sha256 == row["sha256"]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded.model(x), atol=1e-5)
    assert sum(p.numel() for p in loaded.model.parameters()) == pytest.approx(85.8e6, rel=0.01)


def test_fetalclip_full_size_lora_trains_out_proj(tmp_path: Path) -> None:
    model = build_task_model("image_quality", "fetalclip-vit-l14", lora=FETALCLIP_LORA).train()
    layers = dict(lora_layers(model.encoder))
    assert len(layers) == 3 * 24
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # 24 blocks × r·(in + out) for c_fc (1024→4096), c_proj (4096→1024), out_proj (1024²),
    # plus the Linear(768, 1) head.
    assert trainable == 24 * 8 * (5120 + 5120 + 2048) + 769
    logits = model(torch.randn(1, 3, 224, 224))
    nn.functional.binary_cross_entropy_with_logits(logits[:, 0], torch.ones(1)).backward()
    for name, layer in layers.items():
        grad = layer.lora_B["default"].weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
