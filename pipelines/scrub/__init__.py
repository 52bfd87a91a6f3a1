"""Scrub: remove patient identity from pixels (the burned-in strip) and from the header.

- :func:`scrub_band` blanks the strip scanners burn the patient's name, ID and date into
  (:func:`decide_band` once per instance, then :func:`apply_band` on each frame);
- :func:`deidentify` applies the PS3.15 Basic Application Level Confidentiality Profile;
- :func:`require_scrubbed` fails closed when a frame with Burned In Annotation leaves unscrubbed.
"""

from pipelines.scrub.band import (
    BandDecision,
    ScrubParams,
    ScrubReport,
    apply_band,
    decide_band,
    detect_text_band,
    estimate_image_region,
    scrub_band,
)
from pipelines.scrub.deid import deidentify, pseudonymous_patient_key, remap_uid
from pipelines.scrub.guard import UnscrubbedFrameError, require_scrubbed

__all__ = [
    "BandDecision",
    "ScrubParams",
    "ScrubReport",
    "UnscrubbedFrameError",
    "apply_band",
    "decide_band",
    "deidentify",
    "detect_text_band",
    "estimate_image_region",
    "pseudonymous_patient_key",
    "remap_uid",
    "require_scrubbed",
    "scrub_band",
]
