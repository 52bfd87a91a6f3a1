"""The index's header fields straight from a received file's first bytes, without pydicom.

pydicom's ``read_partial`` plus the element conversions behind ``InstanceHeader.from_dataset``
took ~1/6 of the receiver's CPU per instance. For the common case (a data set encoded Explicit
VR Little Endian, which every accepted transfer syntax but Implicit VR LE, Big Endian and
Deflated uses; plain ASCII values; no Contributing Equipment Sequence) this module walks the
top-level elements up to Pixel Data and decodes the ~20 the index needs, the way pydicom would.
Whatever it does not vouch for (another encoding, an unexpected VR or length, a character set or
value outside the plain case, a header larger than :data:`HEAD_BYTES`) yields None, and the
caller parses the file with pydicom as before; ``tests/unit/test_receive_header.py`` compares the
two on every test file that ships with pydicom.
"""

from __future__ import annotations

import re
import struct
from typing import Any

#: How much of the file is read for the header; larger headers take pydicom's path.
HEAD_BYTES = 64 * 1024

_EXPLICIT_VR_LITTLE_ENDIAN_DATASETS = frozenset(
    {
        "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.5",  # RLE Lossless
    }
)

#: Tag -> (keyword, VR) of what the index reads (daemon.db.index.InstanceHeader.from_dataset).
_WANTED: dict[int, tuple[str, str]] = {
    0x00080016: ("SOPClassUID", "UI"),
    0x00080018: ("SOPInstanceUID", "UI"),
    0x00080020: ("StudyDate", "DA"),
    0x00080050: ("AccessionNumber", "SH"),
    0x00080060: ("Modality", "CS"),
    0x00080070: ("Manufacturer", "LO"),
    0x00081090: ("ManufacturerModelName", "LO"),
    0x00100010: ("PatientName", "PN"),
    0x00100020: ("PatientID", "LO"),
    0x00100021: ("IssuerOfPatientID", "LO"),
    0x00100030: ("PatientBirthDate", "DA"),
    0x00100040: ("PatientSex", "CS"),
    0x0020000D: ("StudyInstanceUID", "UI"),
    0x0020000E: ("SeriesInstanceUID", "UI"),
    0x00200011: ("SeriesNumber", "IS"),
    0x00200013: ("InstanceNumber", "IS"),
    0x00280004: ("PhotometricInterpretation", "CS"),
    0x00280008: ("NumberOfFrames", "IS"),
    0x00280010: ("Rows", "US"),
    0x00280011: ("Columns", "US"),
}
_SPECIFIC_CHARACTER_SET = 0x00080005
_CONTRIBUTING_EQUIPMENT = 0x0018A001  # a sequence the loop guard reads: pydicom's path
_PIXEL_DATA = 0x7FE00010
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF

#: PS3.5 §7.1.2: VRs with 2 reserved bytes and a 4-byte length.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN"} | {
    b"UR", b"UT", b"UV"})  # fmt: skip
#: Character sets in which printable ASCII bytes decode to themselves, one value only.
_ASCII_COMPATIBLE = frozenset(
    {"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 126"}
    | {"ISO_IR 127", "ISO_IR 138", "ISO_IR 144", "ISO_IR 148", "ISO_IR 166", "ISO_IR 192"}
)
_PRINTABLE = re.compile(rb"[\x20-\x5b\x5d-\x7e]*")  # printable ASCII without the backslash
_INTEGER = re.compile(r"[+-]?[0-9]+")
_SHORT = struct.Struct("<HH2sH")
_LONG = struct.Struct("<L")
_TAG = struct.Struct("<HHL")


class _NotPlain(Exception):
    """Outside what this module vouches for: the caller uses pydicom."""


def read_header_fields(head: bytes, transfer_syntax: str) -> tuple[dict[str, Any], int] | None:
    """The index's fields of the file whose first bytes are ``head``, and the file offset of its
    top-level Pixel Data element; None where pydicom has to decide (see the module docstring).

    Values are what pydicom's ``Dataset.get(keyword)`` returns for them (``str``; ``int`` for
    US and IS), or absent.
    """
    if transfer_syntax not in _EXPLICIT_VR_LITTLE_ENDIAN_DATASETS:
        return None
    try:
        return _read(memoryview(head))
    except (_NotPlain, struct.error, IndexError, UnicodeDecodeError):
        return None


def _read(head: memoryview) -> tuple[dict[str, Any], int]:
    if bytes(head[128:132]) != b"DICM":
        raise _NotPlain
    offset = 132
    while True:  # File Meta Information: group 0002, Explicit VR LE (PS3.10 §7.1)
        group = int.from_bytes(head[offset : offset + 2], "little")
        if group != 0x0002:
            break
        offset = _skip_element(head, offset)[0]
    found: dict[int, tuple[bytes, bytes]] = {}
    charset = ""
    while True:
        if offset + 8 > len(head):
            raise _NotPlain  # no Pixel Data within HEAD_BYTES
        group, element, vr, length = _SHORT.unpack_from(head, offset)
        tag = group << 16 | element
        if tag == _PIXEL_DATA:
            pixel_offset = offset
            break
        if tag == _CONTRIBUTING_EQUIPMENT or tag in (_ITEM, _ITEM_END, _SEQUENCE_END):
            raise _NotPlain
        end, value = _skip_element(head, offset)
        if tag in _WANTED:
            if tag in found or vr != _WANTED[tag][1].encode():
                raise _NotPlain
            found[tag] = (vr, value)
        elif tag == _SPECIFIC_CHARACTER_SET:
            charset = _plain(value).rstrip(" ")
            if charset not in _ASCII_COMPATIBLE:
                raise _NotPlain
        offset = end
    fields = {}
    for tag, (vr, value) in found.items():
        decoded = _decode(vr, value)
        if decoded is not None:
            fields[_WANTED[tag][0]] = decoded
    return fields, pixel_offset


def _skip_element(head: memoryview, offset: int) -> tuple[int, bytes]:
    """(offset after the element at ``offset``, its value if it has a defined length)."""
    _, _, vr, length = _SHORT.unpack_from(head, offset)
    if not (b"AA" <= vr <= b"ZZ"):
        raise _NotPlain  # pydicom would guess at implicit VR here
    start = offset + 8
    if vr in _LONG_VRS:
        (length,) = _LONG.unpack_from(head, start)
        start += 4
    if length == _UNDEFINED:
        if vr not in (b"SQ", b"UN"):
            raise _NotPlain
        return _skip_undefined_sequence(head, start), b""
    end = start + length
    if end > len(head):
        raise _NotPlain
    return end, bytes(head[start:end])


def _skip_undefined_sequence(head: memoryview, offset: int) -> int:
    """Offset after the Sequence Delimitation Item of a sequence starting at ``offset``."""
    while True:
        group, element, length = _TAG.unpack_from(head, offset)
        tag = group << 16 | element
        offset += 8
        if tag == _SEQUENCE_END:
            return offset
        if tag != _ITEM:
            raise _NotPlain
        if length != _UNDEFINED:
            offset += length
            continue
        while True:  # an item of undefined length: its elements, then an Item Delimiter
            group, element, length = _TAG.unpack_from(head, offset)
            if group << 16 | element == _ITEM_END:
                offset += 8
                break
            offset = _skip_element(head, offset)[0]


def _plain(value: bytes) -> str:
    """``value`` as text if it is printable ASCII without a backslash (one value)."""
    if not _PRINTABLE.fullmatch(value.rstrip(b"\x00")):
        raise _NotPlain
    return value.decode("ascii")


def _decode(vr: bytes, value: bytes) -> Any:
    """The value pydicom's conversion gives for a plain, single value of ``vr``."""
    if vr == b"US":
        if len(value) == 0:
            return None
        if len(value) != 2:
            raise _NotPlain  # several values, or a broken length
        return int.from_bytes(value, "little")
    text = _plain(value).rstrip("\x00 ")
    if vr == b"IS":
        if not text:
            return ""
        if not _INTEGER.fullmatch(text.lstrip(" ")):
            raise _NotPlain  # pydicom's IS accepts more (e.g. "1.0"): let it decide
        return int(text)
    if vr == b"PN" and ("=" in text or text.endswith("^")):
        raise _NotPlain  # component groups, or trailing empty components pydicom may trim
    return text
