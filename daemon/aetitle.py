"""Application Entity titles, validated exactly as DICOM PS3.5 §6.2 (VR "AE") defines them."""

from __future__ import annotations

AE_TITLE_MAX_LENGTH = 16


def validate_ae_title(value: str) -> str:
    """Return the AE title without insignificant leading/trailing spaces, or raise ``ValueError``.

    PS3.5 Table 6.2-1, VR AE: at most 16 characters of the default character repertoire
    (ISO-IR 6, i.e. printable ASCII), no backslash (``\\``) and no control characters;
    leading and trailing spaces are not significant and a value of only spaces is not allowed.
    """
    if not isinstance(value, str):
        raise ValueError(f"AE title must be a string, got {type(value).__name__}")
    if len(value) > AE_TITLE_MAX_LENGTH:
        raise ValueError(
            f"AE title {value!r} is {len(value)} characters; PS3.5 allows at most "
            f"{AE_TITLE_MAX_LENGTH}"
        )
    for ch in value:
        if ch == "\\":
            raise ValueError(f"AE title {value!r} contains a backslash, which PS3.5 forbids")
        if not (" " <= ch <= "~"):
            raise ValueError(
                f"AE title {value!r} contains {ch!r}: only printable ASCII (ISO-IR 6) is allowed"
            )
    stripped = value.strip(" ")
    if not stripped:
        raise ValueError("AE title must not be empty or only spaces (PS3.5 §6.2)")
    return stripped
