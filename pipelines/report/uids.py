"""Deterministic UIDs for the objects usfmd writes.

A result re-built from the same inputs (a retried job, a re-dispatch) must carry the same SOP
Instance UID, or the PACS stores it twice. So result UIDs are derived from stable parts (study UID,
model Device UID, task, source SOP Instance UID, ...) rather than drawn at random.

``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` cannot do this: with ``prefix=None``
pydicom 3 ignores ``entropy_srcs`` and returns a random UUID. The UUID is therefore derived here —
SHA-256 of the parts, stamped as an RFC 9562 version-8 UUID — and written in the ``2.25`` form of
PS3.5 §B.2 (a UUID as one decimal integer under the root 2.25, ≤ 44 characters).
"""

from __future__ import annotations

import hashlib

from pydicom.uid import UID

#: Keeps our UIDs apart from any other SHA-256-derived 2.25 UID built from the same strings.
_NAMESPACE = "usfmd-result-uid"


def derive_uid(*parts: str) -> UID:
    """A valid ``2.25.<n>`` UID that depends only on ``parts`` (in order).

    Parts are joined with NUL, which no DICOM string value contains, so ``("ab", "c")`` and
    ``("a", "bc")`` give different UIDs.

    Raises
    ------
    ValueError
        When no part is given, a part is not a ``str`` or a part contains NUL.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    for index, part in enumerate(parts):
        if not isinstance(part, str):
            raise ValueError(f"derive_uid part {index} must be a str, got {type(part).__name__}")
        if "\x00" in part:
            raise ValueError(f"derive_uid part {index} must not contain NUL")
    digest = bytearray(hashlib.sha256("\x00".join((_NAMESPACE, *parts)).encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80  # version 8 (RFC 9562 §5.8)
    digest[8] = (digest[8] & 0x3F) | 0x80  # variant 10
    return UID(f"2.25.{int.from_bytes(digest, 'big')}")
