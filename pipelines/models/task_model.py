"""A task model: a registered encoder plus a head producing the task's logits.

Training builds one with :func:`build_task_model` (encoder weights from a published checkpoint,
optional LoRA, a fresh head); the daemon gets it back from a usfmd model file
(:mod:`pipelines.models.modelfile`). Either way the model knows its task, encoder card and
preprocessing, so inference and Eigen-CAM need nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.errors import ModelLoadError
from pipelines.models.checkpoints import has_unsaved_buffers
from pipelines.models.heads import HeadSpec, default_head
from pipelines.models.lora import LoraSettings, apply_lora, merge_lora
from pipelines.models.registry import (
    EncoderCard,
    build_encoder,
    create_encoder,
    get_encoder_card,
)
from pipelines.preprocess.spec import PreprocessSpec, get_spec
from pipelines.tasks import TaskSpec, get_task


def logits_to_probabilities(task: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    """(batch, classes) probabilities in the task's class order, float32.

    Softmax heads give one logit per class; a sigmoid head's single logit is the probability of
    the task's last class, the first gets ``1 - p`` (:class:`~pipelines.tasks.TaskSpec`).
    """
    logits = logits.float()
    if logits.ndim != 2 or logits.shape[1] != task.num_outputs:
        raise ValueError(
            f"task {task.name!r} expects logits of shape (batch, {task.num_outputs}), "
            f"got {tuple(logits.shape)}"
        )
    if task.head == "sigmoid":
        positive = torch.sigmoid(logits[:, 0])
        return torch.stack([1.0 - positive, positive], dim=1)
    return torch.softmax(logits, dim=1)


def _plain(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides as JSON values (tuples → lists): they go to model files and DB rows alike."""
    try:
        return dict(json.loads(json.dumps(dict(overrides))))
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"encoder overrides {dict(overrides)} are not plain values") from exc


class TaskModel(nn.Module):
    """Encoder + head; ``forward`` returns ``task.num_outputs`` logits per image.

    Attributes
    ----------
    task
        The :class:`~pipelines.tasks.TaskSpec` whose classes the logits are in.
    encoder_name, overrides
        Registry name and architecture overrides the encoder was built with.
    card
        The encoder's card with the sizes of this instance (:meth:`EncoderCard.resolved`).
    head_spec, lora, preprocessing
        Head recipe, LoRA settings (None without adapters) and the input preprocessing spec.
    """

    def __init__(
        self,
        task: TaskSpec,
        encoder_name: str,
        encoder: nn.Module,
        *,
        overrides: Mapping[str, Any] | None = None,
        head: HeadSpec | None = None,
        lora: LoraSettings | None = None,
        preprocessing: PreprocessSpec | None = None,
    ) -> None:
        super().__init__()
        self.task = task
        self.encoder_name = encoder_name
        self.overrides = _plain(overrides or {})
        self.card: EncoderCard = get_encoder_card(encoder_name).resolved(encoder)
        self.head_spec = head or default_head(task.name)
        self.lora = lora
        self.lora_merged = False
        self.preprocessing = preprocessing or get_spec(self.card.preprocessing)
        if self.preprocessing.size != self.card.input_size:
            raise ModelLoadError(
                f"preprocessing {self.preprocessing.name!r} makes {self.preprocessing.size}² "
                f"inputs but encoder {encoder_name!r} takes {self.card.input_size}²"
            )
        self.encoder = encoder
        self.head = self.head_spec.build(self.card.embed_dim, task.num_outputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits_to_probabilities(self.task, logits)

    @property
    def target_layer(self) -> nn.Module:
        """The Eigen-CAM layer named by the card, inside this model's encoder."""
        return self.card.get_target_layer(self.encoder)

    def merge_lora(self) -> None:
        """Fold LoRA adapters into the encoder for inference (same outputs, no adapter cost)."""
        if self.lora is not None and not self.lora_merged:
            merge_lora(self.encoder)
            self.lora_merged = True


def _preprocessing(name: str | None, card: EncoderCard) -> PreprocessSpec:
    try:
        return get_spec(name or card.preprocessing)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None


def build_task_model(
    task: TaskSpec | str,
    encoder: str,
    *,
    checkpoint: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    head: HeadSpec | None = None,
    lora: LoraSettings | None = None,
    preprocessing: str | None = None,
) -> TaskModel:
    """A trainable task model: encoder (from ``checkpoint`` if given), optional LoRA, new head.

    Parameters
    ----------
    task
        A :class:`~pipelines.tasks.TaskSpec` or a registered task name.
    encoder
        Encoder registry name.
    checkpoint
        Published encoder weights (see :func:`~pipelines.models.registry.create_encoder`).
    overrides
        Architecture overrides (reduced sizes for tests and phantom demos).
    head
        Head recipe; defaults to the task's (:data:`~pipelines.models.heads.DEFAULT_HEADS`).
    lora
        LoRA settings: the encoder is frozen and adapters are trained instead.
    preprocessing
        Preprocessing spec name; defaults to the encoder card's.
    """
    spec = get_task(task) if isinstance(task, str) else task
    card = get_encoder_card(encoder)
    prep = _preprocessing(preprocessing, card)
    module = create_encoder(encoder, checkpoint, **dict(overrides or {}))
    if lora is not None:
        apply_lora(module, lora)
    return TaskModel(
        spec, encoder, module, overrides=overrides, head=head, lora=lora, preprocessing=prep
    )


def assemble_empty(
    task: TaskSpec,
    encoder: str,
    *,
    overrides: Mapping[str, Any],
    head: HeadSpec,
    lora: LoraSettings | None,
    preprocessing: PreprocessSpec,
) -> TaskModel:
    """A task model with allocated but uninitialised weights, for a strict load that fills all.

    Built on the meta device and then allocated, which skips seconds of random initialisation
    for ViT-L; a model with buffers that a state_dict does not carry is built normally.
    """
    card = get_encoder_card(encoder)

    def build() -> TaskModel:
        module = build_encoder(card, overrides, empty=False)
        if lora is not None:
            apply_lora(module, lora)
        return TaskModel(
            task,
            encoder,
            module,
            overrides=overrides,
            head=head,
            lora=lora,
            preprocessing=preprocessing,
        )

    with torch.device("meta"):
        model = build()
    if has_unsaved_buffers(model):
        return build()
    return model.to_empty(device="cpu")
