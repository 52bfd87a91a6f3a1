"""Header de-identification: PS3.15 Annex E Basic Application Level Confidentiality Profile.

Every copy that leaves the receive archive (training sets, exports) goes through
:func:`deidentify` (DESIGN.md §3). The profile's Table E.1-1 is applied as data
(:mod:`pipelines.scrub.profile_table`), recursively into every sequence item, as E.1.1 requires.

Two choices keep the de-identified data useful without making it identifying:

- UIDs are replaced by a *keyed* hash (HMAC-SHA256 → a 2.25 UUID-form UID), so the same original
  UID always maps to the same new one — studies, series and references stay consistent across
  files and across runs — while nobody without the key can recompute or dictionary-attack them.
- Patient ID becomes :func:`pseudonymous_patient_key` (HMAC of issuer and ID), so a patient keeps
  one pseudonym across studies and training can split by patient.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
from collections.abc import Iterable

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence

from pipelines.scrub.profile_table import action_for

#: Shortest key accepted: 128 bits, below which the pseudonyms could be brute-forced.
MIN_KEY_BYTES = 16

#: De-identification Method (0012,0063), LO (≤ 64 characters).
METHOD_TEXT = "PS3.15 E.1-1 Basic Profile; UIDs HMAC-SHA256 remapped"
METHOD_TEXT_DATES = "PS3.15 E.1-1 Basic Profile; HMAC UIDs; all dates emptied"

#: CID 7050 De-identification Method codes (PS3.16).
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
CLEAN_PIXEL_DATA_CODE = ("113101", "DCM", "Clean Pixel Data Option")

#: Dummy values (action D) by Value Representation: non-empty, valid for the VR, meaningless.
_DUMMY_TEXT = {
    "PN": "ANONYMOUS",
    "AE": "ANONYMOUS",
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "IS": "0",
    "DS": "0",
}
_TEXT_VRS = {"LO", "SH", "LT", "ST", "UT", "UC", "CS"}
_NUMERIC_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT"}


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"de-identification key of {len(key) if isinstance(key, bytes | bytearray) else 0} "
            f"bytes: expected at least {MIN_KEY_BYTES} random bytes"
        )


def remap_uid(uid: str, key: bytes) -> str:
    """The replacement of ``uid``: ``2.25.`` and a UUID (version 8) taken from HMAC-SHA256.

    Deterministic for a given key, so every reference to the same instance, series or study
    still points to the same (new) UID.
    """
    _check_key(key)
    digest = bytearray(hmac.new(key, b"usfmd-uid\x00" + uid.strip().encode(), "sha256").digest())
    digest[6] = (digest[6] & 0x0F) | 0x80  # RFC 9562 version 8 (custom)
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 9562 variant
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def pseudonymous_patient_key(patient_id: str, issuer: str, key: bytes, length: int = 16) -> str:
    """Stable pseudonym of a patient: hex prefix of HMAC-SHA256(key, issuer, patient ID).

    The same patient (same ID from the same issuer) gets the same pseudonym in every study, so
    datasets can be split by patient; without the key it cannot be reversed or recomputed.
    Surrounding spaces (DICOM padding) do not matter.

    Parameters
    ----------
    patient_id
        Patient ID (0010,0020) as received.
    issuer
        Issuer of Patient ID (0010,0021), ``""`` when absent.
    key
        Site secret, at least 16 bytes.
    length
        Hex characters kept (16 = 64 bits, collision-free for any realistic archive).
    """
    _check_key(key)
    if not 8 <= length <= 64:
        raise ValueError(f"length={length}: expected 8..64 hex characters")
    message = b"usfmd-patient\x00" + issuer.strip().encode() + b"\x00" + patient_id.strip().encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:length]


def deidentify(
    ds: Dataset, key: bytes, *, pixels_cleaned: bool = False, clean_all_dates: bool = True
) -> Dataset:
    """A de-identified copy of ``ds`` per the Basic Profile; ``ds`` itself is not modified.

    Parameters
    ----------
    ds
        The instance as received (with or without file meta).
    key
        Site secret for UIDs and pseudonyms; the same key must be used for every instance of a
        data set, or references between them break.
    pixels_cleaned
        The caller scrubbed burned-in identifiers from the pixels (:func:`scrub_band`): claims
        the Clean Pixel Data Option (113101) and sets Burned In Annotation to NO.
    clean_all_dates
        Also empty every date and time (DA, DT, TM) the table does not list, such as Instance
        Creation Date, which would otherwise still tell the study date (PS3.15 E.1.1 note 4).

    Returns
    -------
    Dataset
        New dataset with new file meta (the original's may name the sender, E.1.1 item 7),
        Patient Identity Removed YES and the De-identification Method (Code Sequence) set.
    """
    _check_key(key)
    pseudonym = pseudonymous_patient_key(
        str(ds.get("PatientID", "") or ""), str(ds.get("IssuerOfPatientID", "") or ""), key
    )
    out = copy.deepcopy(ds)
    _apply(out, key, clean_all_dates)

    out.PatientID = pseudonym  # Z allows a dummy: this one keeps patient-level splits possible
    out.PatientName = f"PSEUDONYM^{pseudonym}"
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = METHOD_TEXT_DATES if clean_all_dates else METHOD_TEXT
    codes = [BASIC_PROFILE_CODE] + ([CLEAN_PIXEL_DATA_CODE] if pixels_cleaned else [])
    out.DeidentificationMethodCodeSequence = DicomSequence([_code(*c) for c in codes])
    if pixels_cleaned:
        out.BurnedInAnnotation = "NO"

    meta = FileMetaDataset()
    original = getattr(ds, "file_meta", None)
    if original is not None and "TransferSyntaxUID" in original:
        meta.TransferSyntaxUID = original.TransferSyntaxUID
    if "SOPClassUID" in out:
        meta.MediaStorageSOPClassUID = out.SOPClassUID
    if "SOPInstanceUID" in out:
        meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    out.file_meta = meta
    out.preamble = None
    return out


def _apply(dataset: Dataset, key: bytes, clean_all_dates: bool) -> None:
    """Apply the profile to ``dataset`` in place, recursing into every sequence item."""
    for elem in list(dataset):
        action = action_for(elem.tag)
        if action == "X":
            del dataset[elem.tag]
        elif elem.VR == "SQ":
            if action in ("Z", "X/Z"):
                elem.value = DicomSequence([])
            else:  # keep (K), D, U and X/Z/U*: keep the sequence, clean its items
                for item in elem.value:
                    _apply(item, key, clean_all_dates)
        elif action is None:
            if clean_all_dates and elem.VR in ("DA", "DT", "TM"):
                elem.value = None
        elif action == "U" or elem.VR == "UI":  # a listed UID never stays, nor goes empty
            elem.value = _remap_values(elem.value, key)
        elif action in ("Z", "X/Z"):
            elem.value = None
        else:  # D, X/D, X/Z/D, Z/D: a dummy keeps Type 1 attributes valid
            _dummy(elem)


def _remap_values(value: object, key: bytes) -> str | list[str] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return remap_uid(value, key)
    if isinstance(value, Iterable):
        return [remap_uid(str(v), key) for v in value]
    return remap_uid(str(value), key)


def _dummy(elem: DataElement) -> None:
    vr = elem.VR
    if vr in _DUMMY_TEXT:
        elem.value = _DUMMY_TEXT[vr]
    elif vr in _TEXT_VRS:
        elem.value = "ANONYMIZED"
    elif vr in _NUMERIC_VRS:
        elem.value = 0
    else:  # binary (OB, OW, UN, ...): no meaningful dummy exists, empty it
        elem.value = None


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item
