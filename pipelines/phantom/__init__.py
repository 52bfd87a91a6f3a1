"""Synthetic fetal-ultrasound phantom: frames, cines, ground truth and DICOM files for tests.

Nothing here is patient data: every identifier is invented and every file is marked SYNTHETIC.
"""

from pipelines.phantom.overlay import SyntheticPatient
from pipelines.phantom.params import (
    HEART_VIEWS,
    VENTRICULOMEGALY_MM,
    AnnotationParams,
    FanParams,
    HeadParams,
    HeartParams,
    PhantomParams,
)
from pipelines.phantom.sample import (
    MANUFACTURER,
    MODEL,
    PhantomLabels,
    PhantomSample,
    frame_meta,
    make_cine,
    make_phantom,
    phantom_region,
)
from pipelines.phantom.scene import Box

__all__ = [
    "HEART_VIEWS",
    "MANUFACTURER",
    "MODEL",
    "VENTRICULOMEGALY_MM",
    "AnnotationParams",
    "Box",
    "FanParams",
    "HeadParams",
    "HeartParams",
    "PhantomLabels",
    "PhantomParams",
    "PhantomSample",
    "SyntheticPatient",
    "frame_meta",
    "make_cine",
    "make_phantom",
    "phantom_region",
]
