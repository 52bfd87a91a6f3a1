"""Model registry (DB rows + files by sha256) and the workers' hot-reloading model cache.

The registry functions import without torch, so ``usfmd models list|show|activate|...`` start
fast; :class:`~daemon.models.cache.ModelCache` (which needs torch) loads on first use of its names.
"""

from typing import Any

from daemon.models.registry import (
    Activation,
    ModelRegistryError,
    activate,
    active_version,
    deactivate,
    describe,
    get_version,
    import_model,
    list_versions,
    models_dir,
    new_device_uid,
)

_CACHE_NAMES = ("LoadedModel", "ModelCache", "VersionRef")


def __getattr__(name: str) -> Any:
    if name in _CACHE_NAMES:
        from daemon.models import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'daemon.models' has no attribute {name!r}")


__all__ = [
    "Activation",
    "LoadedModel",
    "ModelCache",
    "ModelRegistryError",
    "VersionRef",
    "activate",
    "deactivate",
    "active_version",
    "describe",
    "get_version",
    "import_model",
    "list_versions",
    "models_dir",
    "new_device_uid",
]
