"""The usfmd model file: what training writes and ``usfmd models import`` reads.

One torch file (a plain dict, read back with ``weights_only=True``) holding a format tag, the task
and its class names, the encoder name and overrides, the head, the preprocessing spec (name and
values), the LoRA settings if any, the inpaint settings its training images were cleaned with
(format 2), whether it was trained on synthetic data, free-form metadata and the complete
state_dict. Loading checks every field against the registries and loads the
weights strictly: a file either reproduces the trained model exactly or is refused — never a
model with random weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import torch

from pipelines.errors import ModelLoadError
from pipelines.inpaint import InpaintParams
from pipelines.models.checkpoints import StateDict, load_state_strict
from pipelines.models.heads import HeadSpec
from pipelines.models.lora import LoraSettings
from pipelines.models.registry import check_overrides, get_encoder_card
from pipelines.models.task_model import TaskModel, assemble_empty
from pipelines.preprocess.spec import PreprocessSpec, get_spec
from pipelines.tasks import TaskSpec, get_task

FORMAT = "usfmd-model"
#: 2 added ``inpaint``; files of format 1 still load (their models follow the daemon's settings).
FORMAT_VERSION = 2
READABLE_VERSIONS = frozenset({1, 2})
_FIELDS = frozenset(
    {
        "format",
        "format_version",
        "task",
        "classes",
        "task_head",
        "num_outputs",
        "encoder",
        "head",
        "preprocessing",
        "lora",
        "inpaint",
        "synthetic",
        "metadata",
        "state_dict",
    }
)


@dataclass(frozen=True, slots=True)
class ModelFileInfo:
    """Everything in a model file except the weights, validated."""

    task: TaskSpec
    classes: tuple[str, ...]
    encoder: str
    overrides: dict[str, Any]
    head: HeadSpec
    preprocessing: PreprocessSpec
    lora: LoraSettings | None
    synthetic: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    #: How the training images were inpainted; the daemon cleans this model's frames the same
    #: way. ``None`` (format 1, or not recorded): the daemon's ``[pipeline.inpaint]``.
    inpaint: InpaintParams | None = None

    def parameters(self) -> dict[str, Any]:
        """JSON record of the build, for the model version row's ``parameters``."""
        return {
            "format_version": self.format_version,
            "encoder_overrides": self.overrides,
            "head": self.head.as_dict(),
            "lora": self.lora.as_dict() if self.lora else None,
            "preprocessing": self.preprocessing.as_dict(),
            "inpaint": inpaint_record(self.inpaint),
            "metadata": self.metadata,
        }


@dataclass(frozen=True, slots=True)
class LoadedModelFile:
    info: ModelFileInfo
    model: TaskModel


def _json_object(value: Any, what: str) -> dict[str, Any]:
    try:
        plain = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{what} must be plain JSON data: {exc}") from None
    if not isinstance(plain, dict):
        raise ModelLoadError(f"{what} must be a mapping, got {type(value).__name__}")
    return plain


def save_model_file(
    path: str | Path,
    model: TaskModel,
    *,
    synthetic: bool = False,
    metadata: Mapping[str, Any] | None = None,
    inpaint: InpaintParams | None = None,
) -> str:
    """Write ``model`` atomically (temporary file, fsync, ``os.replace``); return its sha256.

    Parameters
    ----------
    synthetic
        Trained on synthetic phantoms: the registry will name and guard it as such.
    metadata
        Plain JSON data (training summary, metrics), stored with the model version.
    inpaint
        The inpaint settings the training images were cleaned with. Record them whenever they
        may differ from the daemon's defaults: a model fed frames cleaned otherwise than in
        training (e.g. colour flow masked that it learnt to read) can fall to chance.
    """
    if model.lora_merged:
        raise ModelLoadError("save the model before merge_lora(): the file keeps adapters apart")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": model.task.name,
        "classes": list(model.task.class_names),
        "task_head": model.task.head,
        "num_outputs": model.task.num_outputs,
        "encoder": {"name": model.encoder_name, "overrides": dict(model.overrides)},
        "head": model.head_spec.as_dict(),
        "preprocessing": model.preprocessing.as_dict(),
        "lora": model.lora.as_dict() if model.lora else None,
        "inpaint": inpaint_record(inpaint),
        "synthetic": bool(synthetic),
        "metadata": _json_object(dict(metadata or {}), "metadata"),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            torch.save(payload, cast(IO[bytes], _HashingWriter(out, digest)))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return digest.hexdigest()


class _HashingWriter:
    """A binary file that hashes what is written through it (one pass: no re-read)."""

    def __init__(self, out: Any, digest: Any) -> None:
        self._out = out
        self._digest = digest

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        return int(self._out.write(data))

    def flush(self) -> None:
        self._out.flush()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _field(payload: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = payload.get(key)
    if not isinstance(value, kind):
        raise ModelLoadError(f"field {key!r} is {value!r}, expected {kind}")
    return value


def parse_header(payload: Any) -> tuple[ModelFileInfo, StateDict]:
    """Validate a loaded model-file dict against the task, encoder and preprocessing registries."""
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        tag = payload.get("format") if isinstance(payload, Mapping) else type(payload).__name__
        raise ModelLoadError(f"not a usfmd model file (format tag {tag!r}, expected {FORMAT!r})")
    version = payload.get("format_version")
    if version not in READABLE_VERSIONS:
        readable = ", ".join(map(str, sorted(READABLE_VERSIONS)))
        raise ModelLoadError(f"model file format version {version!r}; this usfmd reads {readable}")
    unknown = sorted(set(payload) - _FIELDS)
    if unknown:
        raise ModelLoadError(f"unknown fields {unknown} (written by a newer usfmd?)")
    try:
        task = get_task(_field(payload, "task", str))
    except KeyError as exc:
        raise ModelLoadError(str(exc.args[0])) from None
    classes = tuple(_field(payload, "classes", list))
    if classes != task.class_names:
        raise ModelLoadError(
            f"class names {list(classes)} differ from task {task.name!r}'s "
            f"{list(task.class_names)} (names and order must be equal)"
        )
    if payload.get("task_head") != task.head or payload.get("num_outputs") != task.num_outputs:
        raise ModelLoadError(
            f"head {payload.get('task_head')!r} with {payload.get('num_outputs')!r} outputs, but "
            f"task {task.name!r} is {task.head!r} with {task.num_outputs}"
        )
    encoder = _field(payload, "encoder", dict)
    name = encoder.get("name")
    card = get_encoder_card(str(name))
    overrides = dict(encoder.get("overrides") or {})
    check_overrides(card, overrides)
    recorded = PreprocessSpec.from_dict(_field(payload, "preprocessing", dict))
    try:
        registered = get_spec(recorded.name)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    if registered != recorded:
        raise ModelLoadError(
            f"preprocessing {recorded.name!r} was {recorded.as_dict()} in training but is "
            f"registered as {registered.as_dict()}: inputs would differ from training"
        )
    lora_record = payload.get("lora")
    info = ModelFileInfo(
        task=task,
        classes=classes,
        encoder=card.name,
        overrides=overrides,
        head=HeadSpec.from_dict(_field(payload, "head", dict)),
        preprocessing=registered,
        lora=LoraSettings.from_dict(lora_record) if lora_record is not None else None,
        synthetic=bool(_field(payload, "synthetic", bool)),
        metadata=_json_object(payload.get("metadata") or {}, "metadata"),
        format_version=int(version),
        inpaint=parse_inpaint(payload.get("inpaint")),
    )
    state = _field(payload, "state_dict", dict)
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelLoadError("state_dict must map names to tensors")
    return info, state


def inpaint_record(params: InpaintParams | None) -> dict[str, Any] | None:
    """Every inpaint setting by name (all of them: defaults may change between releases)."""
    return None if params is None else dataclasses.asdict(params)


#: Inpaint settings added after model files began recording them, with the value that gives
#: the behaviour from before: what a file lacking one was trained and validated with.
INPAINT_BEFORE_RECORDED: dict[str, Any] = {"lossy_tolerance": None, "caliper_arm": None}


def parse_inpaint(record: Any) -> InpaintParams | None:
    """The recorded inpaint settings. A setting this usfmd does not know is refused: it could
    not clean frames as the model's training did. One the file lacks (added later) takes its
    value from before it existed (:data:`INPAINT_BEFORE_RECORDED`), else its default."""
    if record is None:
        return None
    if not isinstance(record, Mapping):
        raise ModelLoadError(f"field 'inpaint' is {record!r}, expected a mapping or None")
    known = {f.name for f in dataclasses.fields(InpaintParams)}
    unknown = sorted(set(record) - known)
    if unknown:
        raise ModelLoadError(
            f"inpaint settings {unknown} are unknown to this usfmd: it cannot clean frames the "
            "way this model was trained"
        )
    try:
        return InpaintParams(**{**INPAINT_BEFORE_RECORDED, **dict(record)})
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"inpaint settings are invalid: {exc}") from None


def _read(path: Path) -> Any:
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist")
    try:
        return torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except Exception as exc:  # noqa: BLE001 - any reader failure: not a usable model file
        raise ModelLoadError(
            f"model file {str(path)!r} cannot be read ({type(exc).__name__}: {exc})"
        ) from exc


def read_model_info(path: str | Path) -> ModelFileInfo:
    """The validated header of a model file, without building the model."""
    path = Path(path)
    try:
        return parse_header(_read(path))[0]
    except ModelLoadError as exc:
        raise ModelLoadError(f"model file {str(path)!r}: {exc}") from exc


def load_model_file(
    path: str | Path, *, device: str | torch.device = "cpu", merge_lora: bool = False
) -> LoadedModelFile:
    """Rebuild the trained model from a usfmd model file, in eval mode on ``device``.

    Parameters
    ----------
    merge_lora
        Fold LoRA adapters into the encoder (inference: same outputs, less work).

    Raises
    ------
    ModelLoadError
        Unreadable file, wrong format, classes unlike the task's, unknown encoder or
        preprocessing, or weights that do not fit the described model exactly.
    """
    path = Path(path)
    try:
        info, state = parse_header(_read(path))
        model = assemble_empty(
            info.task,
            info.encoder,
            overrides=info.overrides,
            head=info.head,
            lora=info.lora,
            preprocessing=info.preprocessing,
        )
        load_state_strict(model, state, f"weights of {info.encoder!r} + {info.head.kind} head")
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"model file {str(path)!r}: {exc.reason}",
            missing=exc.missing,
            unexpected=exc.unexpected,
            mismatched=exc.mismatched,
        ) from exc
    if merge_lora:
        model.merge_lora()
    model.eval()
    return LoadedModelFile(info, model.to(device))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
