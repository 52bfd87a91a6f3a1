"""Fine-tuning: recipes, schedule, class weights, losses, metrics on hand-made predictions, best
checkpoint selection, and a few real steps on a tiny ViT that must lower the loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from pipelines.models import FETALCLIP_LORA, bf16_supported, build_task_model, get_encoder_card
from pipelines.tasks import get_task
from training.augment import NONE
from training.finetune import (
    RECIPES,
    BestCheckpoint,
    Recipe,
    class_weights,
    dataset_labels,
    evaluate,
    finetune,
    get_recipe,
    lr_factor,
    make_criterion,
)
from training.metrics import classification_metrics, confusion_matrix, roc_auc

TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 32}
CLIP_TINY = dict(get_encoder_card("fetalclip-vit-l14").tiny_overrides)


def test_recipes_hold_the_papers_numbers() -> None:
    hv, vm, iq = RECIPES["heart_view"], RECIPES["ventriculomegaly"], RECIPES["image_quality"]
    assert (hv.lr, hv.weight_decay, hv.batch_size, hv.epochs) == (5e-4, 0.01, 64, 120)
    assert (vm.lr, vm.weight_decay, vm.batch_size, vm.epochs) == (3e-4, 1e-4, 128, 100)
    assert vm.warmup_fraction == 0.1 and vm.grad_clip == 1.0 and vm.loss == "weighted_ce"
    assert vm.augmentation.crop_scale == (0.5, 2.0) and vm.augmentation.rotation_deg == 90.0
    assert iq.loss == "bce" and iq.batch_size == 32 and iq.epochs == 5 and iq.bf16 is True
    with pytest.raises(KeyError, match="no fine-tuning recipe"):
        get_recipe("nope")


def test_recipe_loss_must_fit_the_head() -> None:
    with pytest.raises(ValueError, match="sigmoid"):
        Recipe(
            task="ventriculomegaly", lr=1e-3, weight_decay=0.0, batch_size=8, epochs=1, loss="bce"
        )
    with pytest.raises(ValueError, match="sigmoid"):
        Recipe(task="image_quality", lr=1e-3, weight_decay=0.0, batch_size=8, epochs=1, loss="ce")


def test_schedule_warms_up_linearly_then_follows_a_half_cosine() -> None:
    total, warmup = 100, 10
    factors = [lr_factor(s, total, warmup, 0.1) for s in range(total)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1)
    mid = warmup + (total - warmup - 1) / 2
    assert lr_factor(int(mid), total, warmup, 0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * (int(mid) - warmup) / (total - warmup - 1)))
    )
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert lr_factor(0, 5, 0) == 1.0  # no warm-up: the peak first


def test_class_weights_are_inverse_frequency() -> None:
    weights = class_weights([30, 10])
    assert weights.tolist() == pytest.approx([40 / 60, 40 / 20])
    # Each class then contributes the same total weight.
    assert 30 * weights[0].item() == pytest.approx(10 * weights[1].item())
    with pytest.raises(ValueError, match="every class"):
        class_weights([5, 0])


def test_weighted_cross_entropy_and_bce() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.5]])
    labels = torch.tensor([0, 1, 1])
    weighted = make_criterion(RECIPES["ventriculomegaly"], get_task("ventriculomegaly"), [3, 1])
    expected = F.cross_entropy(logits, labels, weight=torch.tensor([4 / 6, 4 / 2]))
    assert weighted(logits, labels).item() == pytest.approx(expected.item())
    assert weighted(logits, labels).item() != pytest.approx(F.cross_entropy(logits, labels).item())
    bce = make_criterion(RECIPES["image_quality"], get_task("image_quality"), [3, 1])
    one = logits[:, :1]
    assert bce(one, labels).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(one[:, 0], labels.float()).item()
    )


def test_metrics_on_hand_made_predictions() -> None:
    classes = ("a", "b", "c")
    labels = [0, 0, 0, 1, 1, 2]
    predicted = [0, 0, 1, 1, 2, 2]
    probs = np.eye(3)[predicted] * 0.8 + 0.2 / 3
    m = classification_metrics(labels, probs, classes)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    a, b, c = (m["per_class"][k] for k in classes)
    assert (a["precision"], a["recall"]) == (pytest.approx(1.0), pytest.approx(2 / 3))
    assert (b["precision"], b["recall"]) == (pytest.approx(0.5), pytest.approx(0.5))
    assert (c["precision"], c["recall"]) == (pytest.approx(0.5), pytest.approx(1.0))
    assert a["f1"] == pytest.approx(0.8) and c["f1"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["weighted_recall"] == pytest.approx(m["accuracy"])
    assert m["weighted_f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 2 / 3) / 6)
    assert "auc" not in m


def test_binary_metrics_sensitivity_specificity_auc() -> None:
    labels = [0, 0, 0, 1, 1]
    p_positive = np.array([0.1, 0.6, 0.3, 0.8, 0.4])
    probs = np.stack([1 - p_positive, p_positive], axis=1)
    m = classification_metrics(labels, probs, ("normal", "ventriculomegaly"))
    assert m["positive_class"] == "ventriculomegaly"
    assert m["sensitivity"] == pytest.approx(0.5)  # 0.8 found, 0.4 missed
    assert m["specificity"] == pytest.approx(2 / 3)  # 0.6 is a false positive
    # Pairs (pos, neg) ranked correctly: 0.8 beats all 3, 0.4 beats 0.1 and 0.3 -> 5 of 6.
    assert m["auc"] == pytest.approx(5 / 6)
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)  # ties count half
    assert roc_auc([1, 1], [0.2, 0.9]) is None


def test_confusion_matrix_refuses_out_of_range_classes() -> None:
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 3], [0, 1], 3)


def test_best_checkpoint_takes_highest_accuracy_then_lowest_loss() -> None:
    model = torch.nn.Linear(2, 2)
    best = BestCheckpoint()
    offers = [(0.5, 1.0), (0.7, 0.9), (0.7, 0.8), (0.6, 0.1), (0.7, 0.85)]
    taken = []
    for epoch, (accuracy, loss) in enumerate(offers):
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        taken.append(best.offer(epoch, accuracy, loss, model))
    assert taken == [True, True, True, False, False]
    assert best.epoch == 2
    with torch.no_grad():
        model.weight.fill_(-1.0)
    best.restore(model)
    assert torch.all(model.weight == 2.0)
    with pytest.raises(ValueError, match="no checkpoint"):
        BestCheckpoint().restore(model)


def _toy(n: int, seed: int) -> TensorDataset:
    """Class = which half of the image holds a bright square: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 224, 224, generator=g) * 0.3
    labels = torch.arange(n) % 2
    for i in range(n):
        x0 = 16 if labels[i] == 0 else 144
        images[i, :, 80:144, x0 : x0 + 64] += 2.0
    return TensorDataset(images, labels)


@pytest.fixture(scope="module")
def toy() -> tuple[TensorDataset, TensorDataset]:
    return _toy(32, 0), _toy(16, 1)


def _run(toy: tuple[TensorDataset, TensorDataset], seed: int = 0, **kw: object):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    model = build_task_model("ventriculomegaly", "usf-mae-vit-b16", overrides=TINY)
    recipe = RECIPES["ventriculomegaly"]
    options: dict[str, object] = {
        "epochs": 4,
        "batch_size": 8,
        "augmentation": NONE,
        "bf16": False,
        "seed": seed,
        "threads": 1,  # a second thread only waits when another process holds the core
    }
    options.update(kw)
    result = finetune(model, toy[0], toy[1], recipe, device="cpu", **options)  # type: ignore[arg-type]
    return model, result


def test_a_few_steps_lower_the_loss_and_keep_the_best_epoch(
    toy: tuple[TensorDataset, TensorDataset],
) -> None:
    before = torch.get_num_threads()
    model, result = _run(toy)
    assert torch.get_num_threads() == before  # the caller's setting is restored
    assert result.threads == 1
    assert result.steps == 4 * 4
    history = result.history
    assert history[-1].train_loss < history[0].train_loss
    assert min(e.val_loss for e in history) < history[0].val_loss
    best = max(history, key=lambda e: (e.val_accuracy, -e.val_loss))
    assert result.best_epoch == best.epoch
    # The model now holds the best epoch's weights: evaluating it again gives its numbers.
    again = evaluate(model, toy[1], batch_size=8)
    assert again.metrics["accuracy"] == pytest.approx(best.val_accuracy)
    assert result.best_val["accuracy"] == pytest.approx(best.val_accuracy)
    assert history[-1].lr == pytest.approx(0.0, abs=1e-12)  # half-cosine to min_lr 0


def test_equal_seeds_give_equal_runs(toy: tuple[TensorDataset, TensorDataset]) -> None:
    short = {"epochs": 1, "augmentation": RECIPES["ventriculomegaly"].augmentation}
    _, first = _run(toy, seed=3, **short)
    _, second = _run(toy, seed=3, **short)
    _, third = _run(toy, seed=4, **short)
    assert first.history[0].train_loss == second.history[0].train_loss
    assert first.history[0].train_loss != third.history[0].train_loss


def test_refuses_a_model_of_another_task_and_empty_sets(
    toy: tuple[TensorDataset, TensorDataset],
) -> None:
    model = build_task_model("heart_view", "usf-mae-vit-b16", overrides=TINY)
    with pytest.raises(ValueError, match="recipe for"):
        finetune(model, toy[0], toy[1], RECIPES["ventriculomegaly"], epochs=1)
    with pytest.raises(ValueError, match="non-empty"):
        finetune(
            model,
            toy[0],
            TensorDataset(torch.zeros(0, 3, 224, 224), torch.zeros(0)),
            RECIPES["heart_view"],
        )
    assert dataset_labels(toy[1]).tolist() == [0, 1] * 8


def test_bf16_auto_follows_the_hardware(toy: tuple[TensorDataset, TensorDataset]) -> None:
    _, result = _run(toy, epochs=1, bf16="auto")
    assert result.bf16 == bf16_supported(torch.device("cpu"))
    assert math.isfinite(result.history[0].train_loss)


def test_lora_recipe_trains_adapters_and_head_only(
    toy: tuple[TensorDataset, TensorDataset],
) -> None:
    """image_quality: BCE on the sigmoid head's one logit, frozen FetalCLIP tower + LoRA."""
    torch.manual_seed(0)
    model = build_task_model(
        "image_quality", "fetalclip-vit-l14", overrides=CLIP_TINY, lora=FETALCLIP_LORA
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = finetune(
        model,
        toy[0],
        toy[1],
        RECIPES["image_quality"],
        epochs=1,
        batch_size=8,
        bf16=False,
        threads=1,
        device="cpu",
    )
    assert result.recipe.loss == "bce"
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all("lora_" in k or k.startswith("head.") for k in moved)
    assert any(k.startswith("head.") for k in moved) and any("lora_" in k for k in moved)
