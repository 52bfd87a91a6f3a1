"""Models: encoders by name (with their cards and checkpoint maps), heads, LoRA, model files.

``create_encoder("usf-mae-vit-b16", checkpoint=path)`` builds an encoder and loads a published
checkpoint strictly; :func:`build_task_model` adds the task's head (and LoRA); training saves the
result with :func:`save_model_file`, and the daemon loads it with :func:`load_model_file`.
Every registered encoder's card is in :func:`list_encoders` (DESIGN.md §3).
"""

from pipelines.models import encoders as _encoders  # noqa: F401 - registers the built-ins
from pipelines.models.checkpoints import (
    compare_state,
    filter_open_clip_visual,
    filter_usf_mae,
    load_state_strict,
    read_checkpoint,
    timm_filter,
)
from pipelines.models.heads import DEFAULT_HEADS, HeadSpec, default_head
from pipelines.models.lora import FETALCLIP_LORA, LoraSettings, apply_lora, merge_lora
from pipelines.models.modelfile import (
    FORMAT,
    FORMAT_VERSION,
    LoadedModelFile,
    ModelFileInfo,
    load_model_file,
    read_model_info,
    save_model_file,
    sha256_file,
)
from pipelines.models.registry import (
    EncoderCard,
    create_encoder,
    get_encoder_card,
    list_encoders,
    register_encoder,
    resolve_layer,
)
from pipelines.models.runtime import bf16_supported, resolve_bf16, resolve_device
from pipelines.models.task_model import TaskModel, build_task_model, logits_to_probabilities

__all__ = [
    "DEFAULT_HEADS",
    "FETALCLIP_LORA",
    "FORMAT",
    "FORMAT_VERSION",
    "EncoderCard",
    "HeadSpec",
    "LoadedModelFile",
    "LoraSettings",
    "ModelFileInfo",
    "TaskModel",
    "apply_lora",
    "bf16_supported",
    "build_task_model",
    "compare_state",
    "create_encoder",
    "default_head",
    "filter_open_clip_visual",
    "filter_usf_mae",
    "get_encoder_card",
    "list_encoders",
    "load_model_file",
    "load_state_strict",
    "logits_to_probabilities",
    "merge_lora",
    "read_checkpoint",
    "read_model_info",
    "register_encoder",
    "resolve_bf16",
    "resolve_device",
    "resolve_layer",
    "save_model_file",
    "sha256_file",
    "timm_filter",
]
