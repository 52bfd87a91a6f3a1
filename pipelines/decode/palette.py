"""PALETTE COLOR: expand the red/green/blue tables once, then colour each frame by look-up.

PS3.3 C.7.6.3.1.5-6 (plain tables) and C.7.9.2 (segmented tables). Each stored value indexes the
tables; values below the first mapped value take the first entry, values past the end the last.
16-bit entries keep their most significant byte (``v >> 8``): exact for both encodings seen in
practice, ``v8 << 8`` (Philips) and ``v8 * 257`` (ALOKA). A 16-bit table whose entries all fit in
8 bits is one of the non-conformant "8-bit entries in 16-bit words" tables and is used as is.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Final

import cv2
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut
from pydicom.uid import UID

from pipelines.errors import DecodeError


def _uid(ds: Dataset) -> str:
    return str(ds.get("SOPInstanceUID", "") or "")


def lookup(table: np.ndarray, frame: np.ndarray, offset: int) -> np.ndarray:
    """``table[frame - offset]`` with out-of-range values clamped to the first/last entry."""
    if offset == 0 and frame.dtype == np.uint8 and len(table) == 256 and table.dtype == np.uint8:
        # OpenCV's LUT is ~2x faster than numpy's take for the common 8-bit case.
        if table.ndim == 1:
            return np.asarray(cv2.LUT(frame, table))
        planes = cv2.merge([frame, frame, frame])
        return np.asarray(cv2.LUT(planes, table.reshape(256, 1, table.shape[1])))
    if (
        offset == 0
        and frame.dtype in (np.uint8, np.uint16)
        and len(table) >= 2 ** (8 * frame.itemsize)
    ):
        index: np.ndarray = frame
    else:
        index = frame.astype(np.int64 if frame.itemsize > 2 else np.int32)
        if offset:
            index -= offset
        np.clip(index, 0, len(table) - 1, out=index)
    return table.take(index, axis=0)


#: Expanded palettes by content: a cine, or a study from one scanner, reuses one palette, and a
#: 65,536-entry segmented table (ALOKA) takes ~20 ms to expand.
_PALETTE_CACHE: OrderedDict[bytes, tuple[npt.NDArray[np.uint8], int]] = OrderedDict()
_PALETTE_CACHE_SIZE: Final = 32
_PALETTE_LOCK = threading.Lock()
_PALETTE_KEYWORDS: Final = tuple(
    f"{prefix}{colour}PaletteColorLookupTable{part}"
    for colour in ("Red", "Green", "Blue")
    for prefix, part in (("", "Descriptor"), ("", "Data"), ("Segmented", "Data"))
)


def _palette_key(ds: Dataset) -> bytes:
    """Digest of everything the expanded table depends on (never trust a UID for content)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(ds.get("PixelRepresentation", 0)).encode())
    digest.update(b"<" if is_little_endian(ds) else b">")
    for keyword in _PALETTE_KEYWORDS:
        value = ds.get(keyword)
        digest.update(keyword.encode())
        digest.update(value if isinstance(value, bytes) else repr(value).encode())
    return digest.digest()


def is_little_endian(ds: Dataset) -> bool:
    """Byte order of ``ds``'s OW values as pydicom holds them (raw, as encoded)."""
    little = ds.original_encoding[1] if hasattr(ds, "original_encoding") else None
    if little is None:
        syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
        little = UID(str(syntax)).is_little_endian if syntax else True
    return bool(little)


def _plain_lut(data: bytes, entries: int, little: bool, uid: str) -> np.ndarray:
    """One colour's Palette Color Lookup Table Data (PS3.3 C.7.6.3.1.6), as numbers.

    pydicom keeps OW bytes in the dataset's byte order and its ``apply_color_lut`` reads them as
    little endian whatever the transfer syntax, which garbles Explicit VR Big Endian palettes;
    so plain tables are read here.
    """
    if len(data) in (2 * entries, 2 * entries + 2):  # 16-bit entries (+ odd-length padding)
        return np.frombuffer(data, dtype="<u2" if little else ">u2", count=entries)
    if len(data) in (entries, entries + 1):  # 8-bit entries packed two per OW word
        if little:
            return np.frombuffer(data, dtype=np.uint8, count=entries)
        words = np.frombuffer(data, dtype=">u2", count=len(data) // 2).astype("<u2")
        return words.view(np.uint8)[:entries]
    raise DecodeError(
        f"palette colour lookup table data holds {len(data)} bytes, expected {entries} or "
        f"{2 * entries} for {entries} entries (PS3.3 C.7.6.3.1.6)",
        sop_instance_uid=uid,
    )


def palette_table(ds: Dataset) -> tuple[npt.NDArray[np.uint8], int]:
    """Expand the Palette Color LUTs into one ``(entries, 3)`` uint8 table.

    Parameters
    ----------
    ds
        Header with the Palette Color Lookup Table module (PS3.3 C.7.9), plain or segmented.

    Returns
    -------
    table, first_mapped
        ``table[v - first_mapped]`` is the RGB colour of stored value ``v``.

    Raises
    ------
    DecodeError
        Descriptor or table data missing, or of inconsistent length.
    """
    uid = _uid(ds)
    try:
        descriptor = [int(v) for v in ds.RedPaletteColorLookupTableDescriptor]
        entries, first = descriptor[0] or 2**16, descriptor[1]
    except (AttributeError, TypeError, ValueError, IndexError) as exc:
        raise DecodeError(
            "PALETTE COLOR without a usable (0028,1101) Red Palette Color Lookup Table Descriptor",
            sop_instance_uid=uid,
        ) from exc
    # PS3.3 C.7.6.3.1.5: 0 entries means 2**16; the first mapped value is SS when pixels are signed.
    if ds.get("PixelRepresentation", 0) == 1 and first >= 2**15:
        first -= 2**16
    little = is_little_endian(ds)
    colours = ("Red", "Green", "Blue")
    if all(f"{c}PaletteColorLookupTableData" in ds for c in colours):
        channels = [
            _plain_lut(ds[f"{c}PaletteColorLookupTableData"].value, entries, little, uid)
            for c in colours
        ]
        rgb: np.ndarray = np.stack(channels, axis=-1)
    else:
        try:  # segmented tables (C.7.9.2): pydicom honours the byte order here
            rgb = apply_color_lut(np.arange(first, first + entries, dtype=np.int64), ds)[..., :3]
        except (AttributeError, KeyError, ValueError, TypeError) as exc:
            raise DecodeError(
                f"palette colour lookup tables are incomplete or invalid: {exc}",
                sop_instance_uid=uid,
            ) from exc
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb), first
    if int(rgb.max()) <= 0xFF:
        # 8-bit entries in 16-bit words: non-conformant but seen in the field (C.7.6.3.1.5).
        return np.ascontiguousarray(rgb, dtype=np.uint8), first
    return np.ascontiguousarray(rgb >> 8, dtype=np.uint8), first


def cached_palette_table(ds: Dataset) -> tuple[npt.NDArray[np.uint8], int]:
    """:func:`palette_table`, shared between instances whose tables are byte-identical."""
    key = _palette_key(ds)
    with _PALETTE_LOCK:
        if key in _PALETTE_CACHE:
            _PALETTE_CACHE.move_to_end(key)
            return _PALETTE_CACHE[key]
    entry = palette_table(ds)
    entry[0].flags.writeable = False  # shared between callers
    with _PALETTE_LOCK:
        _PALETTE_CACHE[key] = entry
        while len(_PALETTE_CACHE) > _PALETTE_CACHE_SIZE:
            _PALETTE_CACHE.popitem(last=False)
    return entry
