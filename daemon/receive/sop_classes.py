"""Which SOP classes and transfer syntaxes the receiver accepts, and which it may analyse."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Final

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

# Stored exactly as sent (PS3.5 §10 and Annex A); decoders for each live in pipelines/decode.
# Of the syntaxes a requester proposes in one presentation context, we accept its first that is
# listed here (see preferred_syntax): the requester's order says how the data is held.
TRANSFER_SYNTAXES: Final[tuple[str, ...]] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

# PS3.4 Annex B.5 — Standard SOP Classes (and the retired US classes older scanners still send).
ANALYSABLE_SOP_CLASSES: Final[dict[str, str]] = {
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image Storage",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image Storage",
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.6.2": "Enhanced US Volume Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
}

# Stored and committed, never analysed: reports, key-image notes and documents.
STORED_ONLY_SOP_CLASSES: Final[dict[str, str]] = {
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.35": "Extensible SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection Document Storage",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF Storage",
}

STORAGE_SOP_CLASSES: Final[dict[str, str]] = {**ANALYSABLE_SOP_CLASSES, **STORED_ONLY_SOP_CLASSES}

VERIFICATION: Final = "1.2.840.10008.1.1"
STORAGE_COMMITMENT_PUSH: Final = "1.2.840.10008.1.20.1"
# PS3.4 Annex J.3.5: the well-known SOP Instance of the Storage Commitment Push Model.
STORAGE_COMMITMENT_INSTANCE: Final = "1.2.840.10008.1.20.1.1"

#: Manufacturer (0008,0070) of every object usfmd writes; the loop guard keys on it.
OWN_MANUFACTURER: Final = "usfmd"


def is_analysable(sop_class_uid: str, manufacturer: str | None) -> bool:
    """Whether an instance may be queued for analysis (never our own outputs: loop guard)."""
    if (manufacturer or "").strip() == OWN_MANUFACTURER:
        return False
    return sop_class_uid in ANALYSABLE_SOP_CLASSES


def preferred_syntax(proposed: Sequence[str], supported: Collection[str]) -> str | None:
    """The transfer syntax to accept for one presentation context (PS3.8 §9.3.2.2).

    The first proposed syntax we support, so that data is "stored as sent": a sender offering
    ``[JPEG Lossless, Explicit VR Little Endian]`` holds JPEG Lossless and would otherwise have
    to decompress it (dcmsend does), and one offering ``[Explicit VR LE, JPEG Baseline]`` holds
    uncompressed pixels and must not be asked to compress them lossily. Among the uncompressed
    syntaxes Explicit VR Little Endian is preferred whenever it is offered, as dcmtk's storescp
    does: converting between them changes no pixel, and SCUs commonly list Implicit VR first
    while holding Explicit VR files they will not convert.
    """
    choice = next((syntax for syntax in proposed if syntax in supported), None)
    if choice in _UNCOMPRESSED and ExplicitVRLittleEndian in proposed:
        return ExplicitVRLittleEndian
    return choice


_UNCOMPRESSED: Final = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}
)
