"""Fine-tuning a task model with its paper's recipe: the demo's loop, and ``usfmd retrain``'s.

A :class:`Recipe` per task holds what the paper fixed (DESIGN.md §3): AdamW learning rate and
weight decay, batch size, epochs, warm-up and cosine schedule, gradient clipping, the loss
(class-weighted cross-entropy for ventriculomegaly, BCE for a sigmoid head) and the augmentations.
:func:`finetune` runs it on any :class:`torch.utils.data.Dataset` of ``(image, label)`` pairs —
phantoms now, archived and reviewed studies later — keeping the weights of the epoch with the best
validation accuracy. Sizes a demo shrinks (epochs, batch) are arguments; a recipe is never edited
to fit a run.

Reproducible: shuffling, augmentation and dropout draw from generators seeded by ``seed``; the
number of CPU threads is whatever the caller set (``torch.set_num_threads``) unless ``threads`` is
given for the duration of the call.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from pipelines.models import TaskModel, resolve_bf16, resolve_device
from pipelines.tasks import TaskSpec, get_task
from training.augment import Augmentation, augment_batch, black_level
from training.metrics import classification_metrics

log = logging.getLogger(__name__)

LossKind = Literal["ce", "weighted_ce", "bce"]
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, slots=True)
class Recipe:
    """A paper's fine-tuning hyper-parameters for one task.

    Attributes
    ----------
    lr, weight_decay
        AdamW's peak learning rate and (decoupled) weight decay.
    batch_size, epochs
        As published; :func:`finetune` takes smaller values as arguments.
    warmup_fraction
        Share of all steps with a linear warm-up from 0 to ``lr``; a cosine decay to
        ``min_lr`` follows (with a warm-up: the "half-cosine" of the ventriculomegaly paper).
    grad_clip
        Maximum global gradient norm, or ``None``.
    loss
        ``ce``, ``weighted_ce`` (inverse class frequency in the training set) or ``bce`` (the
        single logit of a sigmoid head, positive = the task's last class).
    augmentation
        Geometry drawn per training image (:class:`~training.augment.Augmentation`).
    bf16
        Autocast to bf16: ``"auto"`` where the hardware multiplies bf16 natively.
    source
        Where the numbers come from.
    """

    task: str
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    warmup_fraction: float = 0.0
    min_lr: float = 0.0
    grad_clip: float | None = None
    loss: LossKind = "ce"
    augmentation: Augmentation = field(default_factory=Augmentation)
    bf16: bool | Literal["auto"] = "auto"
    source: str = ""

    def __post_init__(self) -> None:
        task = get_task(self.task)
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(
                f"lr={self.lr}, weight_decay={self.weight_decay}, min_lr={self.min_lr}: "
                "expected lr > 0, weight_decay ≥ 0, 0 ≤ min_lr ≤ lr"
            )
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(
                f"batch_size={self.batch_size}, epochs={self.epochs}: expected ≥ 1 each"
            )
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction={self.warmup_fraction}: expected 0 ≤ f < 1")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip={self.grad_clip}: expected > 0 or None")
        if (self.loss == "bce") != (task.head == "sigmoid"):
            raise ValueError(
                f"loss {self.loss!r} does not fit task {task.name!r} with a {task.head} head "
                "(bce goes with sigmoid, cross-entropy with softmax)"
            )

    def as_dict(self) -> dict[str, Any]:
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        record["augmentation"] = self.augmentation.as_dict()
        return record


#: DESIGN.md §3, one recipe per built-in task.
RECIPES: Mapping[str, Recipe] = {
    "heart_view": Recipe(
        task="heart_view",
        lr=5e-4,
        weight_decay=0.01,
        batch_size=64,
        epochs=120,
        augmentation=Augmentation(rotation_deg=90.0, hflip=0.5, vflip=0.5, crop_scale=(0.08, 1.0)),
        source="arXiv 2512.24492: AdamW lr 5e-4, wd 0.01, batch 64, 120 epochs, cosine; "
        "rotation 0-90, h/v flips p=0.5, random resized crop",
    ),
    "ventriculomegaly": Recipe(
        task="ventriculomegaly",
        lr=3e-4,
        weight_decay=1e-4,
        batch_size=128,
        epochs=100,
        warmup_fraction=0.1,
        grad_clip=1.0,
        loss="weighted_ce",
        augmentation=Augmentation(rotation_deg=90.0, hflip=0.5, vflip=0.5, crop_scale=(0.5, 2.0)),
        source="ventriculomegaly paper: AdamW lr 3e-4, wd 1e-4, batch 128, 100 epochs, 10 % "
        "linear warm-up then half-cosine, grad-clip 1.0, inverse-frequency weighted CE; "
        "rotation 0-90, flips p=0.5, random resized crop scale 0.5-2.0",
    ),
    "image_quality": Recipe(
        task="image_quality",
        lr=3e-4,
        # The paper gives none: torch's AdamW default.
        weight_decay=0.01,
        batch_size=32,
        epochs=5,
        loss="bce",
        bf16=True,
        source="arXiv 2507.22802: FetalCLIP + LoRA r=8, Linear(768,1) + BCE, AdamW lr 3e-4, "
        "batch 32, 5 epochs, bf16",
    ),
}


def get_recipe(task: str) -> Recipe:
    try:
        return RECIPES[task]
    except KeyError:
        raise KeyError(
            f"no fine-tuning recipe for task {task!r}; known: {sorted(RECIPES)}"
        ) from None


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` (reaching the peak at the last warm-up step), then a
    half cosine from the peak to ``min_ratio`` at the last step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def class_weights(counts: Sequence[int]) -> torch.Tensor:
    """Inverse-frequency weights ``N / (K · n_c)``: each class contributes equally to the loss.

    Raises
    ------
    ValueError
        A class without training examples: its weight would be infinite, and a model cannot
        learn a class it never sees.
    """
    values = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    if values.numel() < 2 or bool((values <= 0).any()):
        raise ValueError(f"class counts {list(counts)}: every class needs training examples")
    return (values.sum() / (values.numel() * values)).float()


def dataset_labels(dataset: Dataset[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """``(N,)`` int64 labels: a ``labels`` tensor attribute if the dataset has one, else read."""
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor):
        return labels.to(torch.int64)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)  # type: ignore[arg-type]


def make_criterion(
    recipe: Recipe, task: TaskSpec, train_counts: Sequence[int]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The recipe's loss as ``criterion(logits, labels)`` (logits in float32)."""
    if recipe.loss == "bce":

        def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(logits.float()[:, 0], labels.float())

        return bce
    weight = class_weights(train_counts) if recipe.loss == "weighted_ce" else None

    def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        w = weight.to(logits.device) if weight is not None else None
        return F.cross_entropy(logits.float(), labels, weight=w)

    if len(train_counts) != task.num_outputs:
        raise ValueError(f"{len(train_counts)} class counts for {task.num_outputs} outputs")
    return cross_entropy


@dataclass
class BestCheckpoint:
    """Keeps the weights of the best epoch: highest validation accuracy, ties to lower loss."""

    epoch: int = -1
    accuracy: float = -1.0
    loss: float = math.inf
    state: dict[str, torch.Tensor] | None = None

    def offer(self, epoch: int, accuracy: float, loss: float, model: torch.nn.Module) -> bool:
        """Take ``model``'s weights if this epoch beats the best so far; return whether it did."""
        better = accuracy > self.accuracy or (accuracy == self.accuracy and loss < self.loss)
        if better:
            self.epoch, self.accuracy, self.loss = epoch, accuracy, loss
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return better

    def restore(self, model: torch.nn.Module) -> None:
        if self.state is None:
            raise ValueError("no checkpoint was kept: nothing to restore")
        model.load_state_dict(self.state)


@dataclass(frozen=True, slots=True)
class Evaluation:
    labels: np.ndarray
    probabilities: np.ndarray
    loss: float
    metrics: dict[str, Any]


@dataclass(frozen=True, slots=True)
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float
    best: bool

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class FinetuneResult:
    """What a run did; the model passed in now holds the best epoch's weights."""

    recipe: Recipe
    epochs: int
    batch_size: int
    steps: int
    best_epoch: int
    best_val: dict[str, Any]
    history: tuple[EpochLog, ...]
    seconds: float
    device: str
    bf16: bool
    threads: int
    seed: int

    def summary(self) -> dict[str, Any]:
        """JSON record for a model file's metadata."""
        return {
            "recipe": self.recipe.as_dict(),
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "steps": self.steps,
            "best_epoch": self.best_epoch,
            "seconds": round(self.seconds, 2),
            "device": self.device,
            "bf16": self.bf16,
            "threads": self.threads,
            "seed": self.seed,
            "history": [e.as_dict() for e in self.history],
        }


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[int]:
    """Run the block with ``count`` torch CPU threads (``None``: as set), then restore them."""
    previous = torch.get_num_threads()
    if count is not None:
        if count < 1:
            raise ValueError(f"threads={count}: expected ≥ 1")
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def evaluate(
    model: TaskModel,
    dataset: Dataset[tuple[torch.Tensor, int]],
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Evaluation:
    """Probabilities, mean loss and :func:`~training.metrics.classification_metrics` on a set."""
    target = torch.device(device)
    model.eval()
    probabilities, labels, losses, seen = [], [], 0.0, 0
    with torch.inference_mode(), _autocast(target, bf16):
        for images, batch_labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            images, batch_labels = images.to(target), batch_labels.to(target)
            logits = model(images).float()
            if criterion is not None:
                losses += float(criterion(logits, batch_labels)) * len(batch_labels)
            probabilities.append(model.probabilities(logits).cpu())
            labels.append(batch_labels.cpu())
            seen += len(batch_labels)
    probs = torch.cat(probabilities).numpy()
    truth = torch.cat(labels).numpy()
    metrics = classification_metrics(truth, probs, model.task.class_names)
    return Evaluation(truth, probs, losses / max(seen, 1), metrics)


def finetune(
    model: TaskModel,
    train: Dataset[tuple[torch.Tensor, int]],
    val: Dataset[tuple[torch.Tensor, int]],
    recipe: Recipe,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    augmentation: Augmentation | None = None,
    bf16: bool | Literal["auto"] | None = None,
    seed: int = 0,
    threads: int | None = None,
    device: str = "auto",
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> FinetuneResult:
    """Train ``model`` with ``recipe``; leave it holding the best validation epoch's weights.

    Parameters
    ----------
    model
        A :class:`~pipelines.models.TaskModel` of ``recipe.task``; only parameters that require
        gradients are trained (LoRA freezes the encoder).
    train, val
        ``(image, label)`` datasets; images preprocessed for ``model`` (``(3, S, S)`` float32).
    epochs, batch_size, augmentation, bf16
        Run-size overrides (a demo, a smoke test); ``None`` keeps the recipe's.
    seed
        Seeds shuffling, augmentation and dropout: equal seeds, equal runs.
    threads
        CPU threads for this call; ``None`` leaves ``torch.get_num_threads()`` as the caller set.
    device
        ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    on_epoch
        Called after each epoch's validation (progress output).
    """
    if model.task.name != recipe.task:
        raise ValueError(f"model is for task {model.task.name!r}, recipe for {recipe.task!r}")
    if len(train) == 0 or len(val) == 0:  # type: ignore[arg-type]
        raise ValueError("fine-tuning needs a non-empty training and validation set")
    n_epochs = epochs if epochs is not None else recipe.epochs
    n_batch = batch_size if batch_size is not None else recipe.batch_size
    if n_epochs < 1 or n_batch < 1:
        raise ValueError(f"epochs={n_epochs}, batch_size={n_batch}: expected ≥ 1 each")
    aug = augmentation if augmentation is not None else recipe.augmentation
    target = resolve_device(device)
    use_bf16 = resolve_bf16(recipe.bf16 if bf16 is None else bf16, target)
    task = model.task
    train_labels = dataset_labels(train)
    counts = torch.bincount(train_labels, minlength=len(task.class_names)).tolist()
    criterion = make_criterion(recipe, task, counts)
    black = black_level(model.preprocessing)

    start = time.perf_counter()
    with torch_threads(threads) as n_threads:
        torch.manual_seed(seed)  # dropout and anything else drawing from the global generator
        shuffle = torch.Generator().manual_seed(seed)
        geometry = torch.Generator().manual_seed(seed + 1)
        loader = DataLoader(train, batch_size=n_batch, shuffle=True, generator=shuffle)
        model.to(target)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
        total = n_epochs * len(loader)
        warmup = round(recipe.warmup_fraction * total)
        min_ratio = recipe.min_lr / recipe.lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total, warmup, min_ratio)
        )
        best = BestCheckpoint()
        history: list[EpochLog] = []
        best_val: dict[str, Any] = {}
        for epoch in range(n_epochs):
            epoch_start = time.perf_counter()
            model.train()
            running, seen = 0.0, 0
            for images, labels in loader:
                images = augment_batch(images.to(target), aug, geometry, black)
                labels = labels.to(target)
                with _autocast(target, use_bf16):
                    logits = model(images)
                loss = criterion(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if recipe.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
                optimizer.step()
                scheduler.step()
                running += float(loss.detach()) * len(labels)
                seen += len(labels)
            result = evaluate(
                model, val, batch_size=n_batch, device=target, bf16=use_bf16, criterion=criterion
            )
            accuracy = float(result.metrics["accuracy"])
            improved = best.offer(epoch, accuracy, result.loss, model)
            if improved:
                best_val = result.metrics
            entry = EpochLog(
                epoch=epoch,
                train_loss=running / max(seen, 1),
                val_loss=result.loss,
                val_accuracy=accuracy,
                lr=float(optimizer.param_groups[0]["lr"]),
                seconds=time.perf_counter() - epoch_start,
                best=improved,
            )
            history.append(entry)
            log.info("fine-tuning epoch", extra=entry.as_dict())
            if on_epoch is not None:
                on_epoch(entry)
        best.restore(model)
        model.eval()
    return FinetuneResult(
        recipe=recipe,
        epochs=n_epochs,
        batch_size=n_batch,
        steps=total,
        best_epoch=best.epoch,
        best_val=copy.deepcopy(best_val),
        history=tuple(history),
        seconds=time.perf_counter() - start,
        device=str(target),
        bf16=use_bf16,
        threads=n_threads,
        seed=seed,
    )
