"""The workers' model cache: the active version of each task, loaded on demand, hot-reloaded.

A worker asks :meth:`ModelCache.get` for a task before analysing. The cache looks up the active
version at most every ``models.reload_seconds`` per task, so an ``usfmd models activate`` reaches
running workers without a restart. Before loading, the file's sha256 must equal the row's: a
changed or corrupt file is refused with an error, never loaded, and never replaced by random
weights. No active version gives None: the caller leaves the work awaiting a model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from daemon.config import Settings
from daemon.db.engine import Database
from daemon.models.registry import ModelRegistryError, active_version, models_dir
from pipelines.errors import ModelLoadError
from pipelines.inpaint import InpaintParams
from pipelines.models.modelfile import load_model_file, sha256_file
from pipelines.models.registry import EncoderCard
from pipelines.models.runtime import resolve_bf16, resolve_device
from pipelines.models.task_model import TaskModel
from pipelines.preprocess.spec import PreprocessSpec
from pipelines.tasks import TaskSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class VersionRef:
    """The registry row's facts a worker needs (a snapshot, detached from any DB session)."""

    id: int
    task: str
    version: str
    algorithm_name: str
    device_uid: str
    synthetic: bool
    sha256: str
    path: str
    encoder: str
    preprocessing: str
    classes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """An active version, loaded and ready: the model (eval mode, LoRA merged) and its facts.

    ``bf16`` says whether inference should autocast to bf16 on ``device``, ``compiled`` whether
    it runs through ``torch.compile`` (``models.compile``); ``inpaint`` is how
    the model's training images were inpainted (``None``: not recorded, use the daemon's).
    """

    ref: VersionRef
    task: TaskSpec
    model: TaskModel
    preprocessing: PreprocessSpec
    device: torch.device
    bf16: bool
    inpaint: InpaintParams | None = None
    compiled: bool = False

    @property
    def card(self) -> EncoderCard:
        return self.model.card


@dataclass(slots=True)
class _Slot:
    checked_at: float
    loaded: LoadedModel | None = None
    #: The version that failed to load and why; re-raised until the next check, which retries
    #: (an operator may have restored the file).
    failure: tuple[int, ModelRegistryError] | None = None


class ModelCache:
    """Per-process cache of each task's active model.

    Parameters
    ----------
    db
        The index database (reads ``model_versions``).
    directory
        ``<data_dir>/models``, where the registry keeps the files.
    reload_seconds
        Longest time before a newly activated version is noticed.
    device, bf16, compiled
        ``models.device``, ``models.bf16`` and ``models.compile`` settings.
    clock
        Monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        db: Database,
        directory: Path,
        *,
        reload_seconds: float = 10.0,
        device: str = "auto",
        bf16: bool | str = "auto",
        compiled: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._directory = Path(directory)
        self._reload = reload_seconds
        self._device = resolve_device(device)
        self._bf16 = resolve_bf16(bf16, self._device)
        self._compiled = compiled
        self._clock = clock
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, db: Database, settings: Settings) -> ModelCache:
        return cls(
            db,
            models_dir(settings.storage.data_dir),
            reload_seconds=settings.models.reload_seconds,
            device=settings.models.device,
            bf16=settings.models.bf16,
            compiled=settings.models.compile,
        )

    @property
    def device(self) -> torch.device:
        return self._device

    def get(self, task: str) -> LoadedModel | None:
        """The active version of ``task``, loaded; None when the task has no active version.

        Raises
        ------
        ModelRegistryError
            The active version's file is missing, differs from its recorded sha256, or does not
            load; raised again on every call until the next check of the active version.
        """
        with self._lock:
            now = self._clock()
            slot = self._slots.get(task)
            if slot is not None and now - slot.checked_at < self._reload:
                if slot.failure is not None:
                    raise slot.failure[1]
                return slot.loaded
            ref = self._active_ref(task)
            if slot is None:
                slot = self._slots[task] = _Slot(checked_at=now)
            slot.checked_at = now
            if ref is None:
                if slot.loaded is not None:
                    log.info("model version no longer active", extra={"task": task})
                slot.loaded, slot.failure = None, None
                return None
            if slot.loaded is not None and slot.loaded.ref.id == ref.id:
                return slot.loaded
            try:
                loaded = self._load(ref)
            except ModelRegistryError as exc:
                slot.failure = (ref.id, exc)
                log.error(
                    "active model version cannot be used",
                    extra={"task": task, "model_id": ref.id, "error": str(exc)},
                )
                raise
            previous = slot.loaded.ref.id if slot.loaded else None
            slot.loaded, slot.failure = loaded, None
            log.info(
                "model version loaded",
                extra={
                    "task": task,
                    "model_id": ref.id,
                    "previous": previous,
                    "device": str(self._device),
                    "bf16": self._bf16,
                },
            )
            return loaded

    def invalidate(self, task: str | None = None) -> None:
        """Forget cached state so the next :meth:`get` checks the registry at once."""
        with self._lock:
            if task is None:
                self._slots.clear()
            else:
                self._slots.pop(task, None)

    def _active_ref(self, task: str) -> VersionRef | None:
        with self._db.read() as session:
            row = active_version(session, task)
            if row is None:
                return None
            return VersionRef(
                id=row.id,
                task=row.task,
                version=row.version,
                algorithm_name=row.algorithm_name,
                device_uid=row.device_uid,
                synthetic=row.synthetic,
                sha256=row.sha256,
                path=row.path,
                encoder=row.encoder,
                preprocessing=row.preprocessing,
                classes=tuple(row.classes),
            )

    def _load(self, ref: VersionRef) -> LoadedModel:
        label = f"model version {ref.id} ({ref.task}:{ref.version})"
        directory = self._directory.resolve()
        path = (directory / ref.path).resolve()
        if path.parent != directory:
            raise ModelRegistryError(f"{label}: path {ref.path!r} is outside {directory}")
        if not path.is_file():
            raise ModelRegistryError(f"{label}: file {str(path)!r} is missing")
        # Files in the registry are immutable once imported, so hashing then loading is safe.
        actual = sha256_file(path)
        if actual != ref.sha256:
            raise ModelRegistryError(
                f"{label}: file {path.name} has sha256 {actual}, the registry recorded "
                f"{ref.sha256}; refusing to load a changed or corrupt model"
            )
        try:
            loaded = load_model_file(path, device=self._device, merge_lora=True)
        except ModelLoadError as exc:
            raise ModelRegistryError(f"{label}: {exc}") from exc
        info = loaded.info
        recorded = (ref.task, ref.encoder, ref.preprocessing, ref.classes)
        found = (info.task.name, info.encoder, info.preprocessing.name, info.classes)
        if recorded != found:
            raise ModelRegistryError(f"{label}: file describes {found}, registry row {recorded}")
        return LoadedModel(
            ref=ref,
            task=info.task,
            model=loaded.model,
            preprocessing=info.preprocessing,
            device=self._device,
            bf16=self._bf16,
            compiled=self._compiled,
            inpaint=info.inpaint,
        )
