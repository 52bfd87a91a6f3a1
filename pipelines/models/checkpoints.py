"""Reading weight files and fitting them to a model exactly: strict, or a clear refusal.

Published checkpoints come in other projects' layouts (DESIGN.md §3: USF-MAE's flat MAE
state_dict, Facebook MAE's ``{"model": ...}``, open_clip's ``{"state_dict": ...}`` with
``module.`` prefixes, timm files). Each encoder's ``checkpoint_filter_fn`` maps its foreign layout
onto the model's keys; :func:`load_state_strict` then accepts nothing less than every key with
its shape. Files are read with ``weights_only=True``: a checkpoint can carry tensors and plain
containers, never code.
"""

from __future__ import annotations

import argparse
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.errors import ModelLoadError

StateDict = dict[str, torch.Tensor]
#: Maps a loaded checkpoint object (whatever its wrapper) to the model's own keys.
FilterFn = Callable[[Any], StateDict]

#: Plain-data classes that training scripts pickle beside the weights (Facebook MAE saves its
#: ``argparse.Namespace`` as ``args``); allowed by the weights-only unpickler, nothing else is.
_SAFE_GLOBALS: list[Any] = [argparse.Namespace]
#: Wrappers that training scripts put around a state_dict, in the order we look for them.
_WRAPPERS = ("state_dict", "model", "model_state_dict", "module")


def read_checkpoint(path: str | Path) -> Any:
    """Load a weight file: ``.safetensors``, or a torch file read with ``weights_only=True``.

    Zip-format torch files are memory-mapped, so a 1.6 GB checkpoint of which we keep the
    vision tower is not read into memory whole.

    Raises
    ------
    ModelLoadError
        The file is missing or is not a weights-only checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(
                path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure means the same: unusable file
        raise ModelLoadError(
            f"checkpoint {str(path)!r} cannot be read as weights ({type(exc).__name__}: {exc})"
        ) from exc


def unwrap_state_dict(obj: Any, wrappers: tuple[str, ...] = _WRAPPERS) -> StateDict:
    """The tensor mapping inside a checkpoint, looking through the usual training wrappers."""
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}; never loops on a cycle
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        inner = next((obj[w] for w in wrappers if isinstance(obj.get(w), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, Mapping):
        kinds = sorted({type(v).__name__ for v in obj.values()})
        raise ModelLoadError(
            f"checkpoint is not a state_dict: a mapping with keys {sorted(obj)[:8]} and values "
            f"of type {kinds}, none of the wrappers {list(wrappers)} holds tensors"
        )
    raise ModelLoadError(f"checkpoint is a {type(obj).__name__}, expected a state_dict mapping")


def strip_prefix(state: StateDict, prefix: str) -> StateDict:
    """Remove ``prefix`` from every key that has it (``module.`` from DataParallel/DDP)."""
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def drop_keys(state: StateDict, prefixes: tuple[str, ...]) -> StateDict:
    """Keys starting with any of ``prefixes`` removed (decoders, classifiers, text towers)."""
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def compare_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> ModelLoadError | None:
    """What keeps ``state`` from loading into ``model`` with ``strict=True``; None if nothing."""
    expected = model.state_dict()
    missing = tuple(k for k in expected if k not in state)
    unexpected = tuple(k for k in state if k not in expected)
    mismatched = tuple(
        (k, tuple(state[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if not (missing or unexpected or mismatched):
        return None
    return ModelLoadError(
        "checkpoint does not match the model",
        missing=missing,
        unexpected=unexpected,
        mismatched=mismatched,
    )


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Load ``state`` with ``strict=True`` after checking keys and shapes ourselves.

    torch's own error stops at the first shape mismatch; ours lists every problem at once, and
    refuses non-finite weights, which no trained model has and a corrupt file often does.

    Raises
    ------
    ModelLoadError
        Naming ``what`` (file and encoder), the missing and unexpected keys and the mismatches.
    """
    problem = compare_state(model, state)
    if problem is not None:
        raise ModelLoadError(
            f"{what}: {problem.reason}",
            missing=problem.missing,
            unexpected=problem.unexpected,
            mismatched=problem.mismatched,
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not _finite(v)]
    if bad:
        raise ModelLoadError(f"{what}: non-finite values (NaN/inf) in {', '.join(bad[:8])}")
    model.load_state_dict(state, strict=True)


def _finite(tensor: torch.Tensor) -> bool:
    if tensor.numel() == 0:
        return True
    # An expanded (zero-stride) view repeats its elements: checking one slice covers them all.
    for dim, stride in enumerate(tensor.stride()):
        if stride == 0:
            tensor = tensor.narrow(dim, 0, 1)
    return bool(torch.isfinite(tensor).all())


def has_unsaved_buffers(model: nn.Module) -> bool:
    """Whether ``model`` has buffers a state_dict does not carry (then it must be initialised)."""
    saved = set(model.state_dict())
    return any(name not in saved for name, _ in model.named_buffers())


# --- checkpoint_filter_fn of each encoder family -------------------------------------------


def filter_usf_mae(obj: Any) -> StateDict:
    """USF-MAE / Facebook MAE → timm ViT encoder keys.

    The USF-MAE release is a flat state_dict of the whole MAE (254 tensors); Facebook MAE
    checkpoints wrap it as ``{"model": ...}``. The 150 encoder tensors are already named as in
    timm's ViT; the mask token, the decoder and any classifier head are not part of the encoder.
    """
    state = strip_prefix(unwrap_state_dict(obj), "module.")
    return drop_keys(state, ("mask_token", "decoder_", "head."))


def filter_open_clip_visual(obj: Any) -> StateDict:
    """open_clip CLIP checkpoint (FetalCLIP) → the vision tower's own keys.

    FetalCLIP is an open_clip training checkpoint ``{"state_dict": ..., "epoch": ...}`` whose keys
    may carry DDP's ``module.``; classification needs only ``visual.*``, so the text tower,
    ``logit_scale`` and ``text_projection`` are dropped.
    """
    state = strip_prefix(unwrap_state_dict(obj), "module.")
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise ModelLoadError(
            f"no 'visual.*' keys among {len(state)} tensors: not an open_clip CLIP checkpoint "
            f"(first keys: {sorted(state)[:5]})"
        )
    return visual


def timm_filter(classifier: str) -> FilterFn:
    """A timm-format file (model ``state_dict``, e.g. from a timm hub snapshot) → encoder keys.

    Parameters
    ----------
    classifier
        The ImageNet classifier's module name (timm's ``pretrained_cfg["classifier"]``): the
        encoder is built without it, so its weights are dropped.
    """

    def filter_fn(obj: Any) -> StateDict:
        state = strip_prefix(unwrap_state_dict(obj), "module.")
        return drop_keys(state, (classifier + ".",))

    filter_fn.__name__ = f"timm_filter_{classifier.replace('.', '_')}"
    return filter_fn
