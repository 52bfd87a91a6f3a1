"""Preprocess: RGB frames to normalised 224 x 224 model inputs, and the way back for heat-maps.

Training and the daemon both call these functions, so a model always sees inputs built exactly
as during its training (DESIGN.md §2-3). Specs are looked up by name (``"usf-mae"``,
``"fetalclip"``); each model version records the spec it was trained with.
"""

from pipelines.preprocess.core import (
    ModelInput,
    normalisation_table,
    preprocess,
    preprocess_batch,
)
from pipelines.preprocess.geometry import GridMapping
from pipelines.preprocess.spec import (
    CLIP_MEAN,
    CLIP_STD,
    FETALCLIP,
    IMAGENET_MEAN,
    IMAGENET_STD,
    USF_MAE,
    Geometry,
    Interpolation,
    PreprocessSpec,
    available_specs,
    get_spec,
    register_spec,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FETALCLIP",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "USF_MAE",
    "Geometry",
    "GridMapping",
    "Interpolation",
    "ModelInput",
    "PreprocessSpec",
    "available_specs",
    "get_spec",
    "normalisation_table",
    "preprocess",
    "preprocess_batch",
    "register_spec",
]
