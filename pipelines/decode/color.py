"""Turn one decoded frame, in whatever Photometric Interpretation it was stored, into RGB uint8.

Every later stage (scrub, inpaint, preprocess, explain) works on ``(rows, columns, 3)`` uint8 RGB,
so the colour rules live here once. :func:`rgb_converter` inspects the Image Pixel module
(PS3.3 C.7.6.3) once per instance and returns a per-frame function; all per-instance work (palette
expansion, grey curves) is done up front into small lookup tables, so the per-frame cost is one
table look-up or one copy. Input frames are what pydicom's decoder yields with ``raw=False``:
YBR_FULL / YBR_FULL_422 already RGB (:class:`YBRConverter` applies pydicom's PS3.3 C.7.6.3.1.2
equations, bit for bit), and YBR_ICT / YBR_RCT already RGB because every JPEG 2000 decoder applies
the inverse multiple-component transform (PS3.5 A.4.4, ISO/IEC 15444-1 Annex G).

Rules (the ones a reader needs to trust a model's input):

* **PALETTE COLOR** (C.7.6.3.1.5-6, C.7.9.2): table look-up; 16-bit entries keep their most
  significant byte (details in :mod:`pipelines.decode.palette`).
* **MONOCHROME2**: 8-bit unsigned data without a Modality LUT are shown as stored (an ultrasound
  scanner writes the displayed grey levels; Window Center/Width on such images are nominal) and
  copied to three channels. Anything else (more or fewer bits, signed, rescaled) goes through the
  Modality LUT (C.11.1), then the first VOI window (C.11.2.1.2: LINEAR, LINEAR_EXACT, SIGMOID)
  written straight to 0..255, or the first VOI LUT (C.11.2.1.1); without either, the full range the
  stored bits can hold is mapped linearly to 0..255, so frames of a cine stay comparable (never a
  per-frame min/max).
* **MONOCHROME1**: the same, then inverted (``255 - v``), since its minimum is white (C.7.6.3.1.2).
* **RGB / YBR_***: 8-bit samples pass unchanged; deeper samples are scaled by their bit depth.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Final

import cv2
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, convert_color_space
from pydicom.pixels.processing import apply_voi

from pipelines.decode.palette import cached_palette_table, lookup
from pipelines.errors import DecodeError

RGBFrame = npt.NDArray[np.uint8]
#: Maps one decoded frame (``iter_pixels`` output) to a C-contiguous ``(rows, columns, 3)`` uint8.
RGBConverter = Callable[[np.ndarray], RGBFrame]

#: Photometric Interpretations :func:`rgb_converter` accepts, with their Samples per Pixel
#: (PS3.3 C.7.6.3.1.2). YBR_PARTIAL_420 exists only inside MPEG/H.26x streams, which pydicom does
#: not decode; retired values (ARGB, CMYK, HSV, YBR_PARTIAL_422) are refused.
SUPPORTED_PHOTOMETRIC: Final[dict[str, int]] = {
    "MONOCHROME1": 1,
    "MONOCHROME2": 1,
    "PALETTE COLOR": 1,
    "RGB": 3,
    "YBR_FULL": 3,
    "YBR_FULL_422": 3,
    "YBR_ICT": 3,
    "YBR_RCT": 3,
}

#: Grey and bit-depth look-up tables cover every stored value up to this many bits.
_MAX_TABLE_BITS: Final = 16


def _uid(ds: Dataset) -> str:
    return str(ds.get("SOPInstanceUID", "") or "")


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        raise DecodeError(f"(0028) {keyword} is missing", sop_instance_uid=_uid(ds))
    return int(value)


def rgb_converter(ds: Dataset) -> RGBConverter:
    """Build the function that maps each decoded frame of ``ds`` to RGB uint8.

    Parameters
    ----------
    ds
        The instance's header (pixel data not needed): the Image Pixel module, and the Palette
        Color, Modality LUT and VOI LUT modules when present.

    Returns
    -------
    RGBConverter
        Called once per frame; tables are built here, once.

    Raises
    ------
    DecodeError
        The Photometric Interpretation is unsupported or disagrees with Samples per Pixel, or the
        palette / LUT attributes are incomplete.
    """
    uid = _uid(ds)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise DecodeError(
            f"(0028,0004) Photometric Interpretation {photometric!r} is not supported; "
            f"expected one of {sorted(SUPPORTED_PHOTOMETRIC)}",
            sop_instance_uid=uid,
        )
    samples = _int(ds, "SamplesPerPixel", 1)
    if samples != SUPPORTED_PHOTOMETRIC[photometric]:
        # PS3.3 C.7.6.3.1.2 fixes Samples per Pixel for each Photometric Interpretation.
        raise DecodeError(
            f"(0028,0002) Samples per Pixel is {samples} but {photometric} requires "
            f"{SUPPORTED_PHOTOMETRIC[photometric]} (PS3.3 C.7.6.3.1.2)",
            sop_instance_uid=uid,
        )
    bits_stored = _int(ds, "BitsStored", _int(ds, "BitsAllocated", 8))
    if photometric == "PALETTE COLOR":
        return _palette_converter(ds)
    if photometric.startswith("MONOCHROME"):
        return _grey_converter(ds, bits_stored)
    if bits_stored == 8:
        return _rgb8
    return _deep_rgb_converter(bits_stored)


#: PS3.3 C.7.6.3.1.2 YBR_FULL -> RGB, exactly the float32 matrix pydicom's
#: ``convert_color_space`` multiplies by (rows are Y, Cb - 128, Cr - 128; columns R, G, B).
_YBR_TO_RGB: Final = np.asarray(
    [
        [1.000, 1.000, 1.000],
        [0.000, -0.114 * 1.772 / 0.587, 1.772],
        [1.402, -0.299 * 1.402 / 0.587, 0.000],
    ],
    dtype=np.float32,
)
#: Pixels per matrix product: small enough for OpenBLAS to stay on this thread (a whole frame
#: wakes its thread pool, which costs 10x the arithmetic when workers already fill the cores) and
#: for every step of a block to run in cache.
_YBR_BLOCK: Final = 8192
#: Subtracted from (Y, Cb, Cr) before the product; an OpenCV scalar has four slots.
_YBR_OFFSET: Final = (0.0, 128.0, 128.0, 0.0)
_HALF: Final = np.float32(0.5)

_SCRATCH = threading.local()


def _ybr_scratch() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """This thread's two block-sized float buffers, kept for the next block, frame and file."""
    buffers: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = (np.empty((_YBR_BLOCK, 3), np.float32), np.empty((_YBR_BLOCK, 3), np.float32))
        _SCRATCH.buffers = buffers
    return buffers


class YBRConverter:
    """YBR_FULL (and upsampled YBR_FULL_422) frames to RGB, bit-identical to pydicom, ~3× faster.

    pydicom computes ``floor((Y, Cb - 128, Cr - 128) · M + 0.5)`` in float32, clipped to 0..255.
    This does the same float32 operations — the same BLAS matrix product, so the same rounding,
    equal on all 2^24 inputs (tested) — block by block, so that the offsets (integers, exact in
    float32), the product, ``+ 0.5``, the clip and the cast each touch a cache-resident block
    instead of a 6 MB float frame. ``floor`` is left to the cast: after the clip every value is
    in 0..255, where truncation is ``floor``. Samples deeper than 8 bits go to pydicom.
    """

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            return np.asarray(convert_color_space(frame, "YBR_FULL", "RGB"))
        samples = np.ascontiguousarray(frame).reshape(-1, 1, 3)  # OpenCV sees 3 channels
        out = np.empty(frame.shape, np.uint8)
        rgb = out.reshape(-1, 3)
        shifted, product = _ybr_scratch()
        total = samples.shape[0]
        for start in range(0, total, _YBR_BLOCK):
            stop = min(start + _YBR_BLOCK, total)
            n = stop - start
            cv2.subtract(  # type: ignore[call-overload]  # OpenCV's stubs omit scalars
                samples[start:stop],
                _YBR_OFFSET,
                dst=shifted[:n].reshape(n, 1, 3),
                dtype=cv2.CV_32F,
            )
            block = product[:n]
            np.matmul(shifted[:n], _YBR_TO_RGB, out=block)
            np.add(block, _HALF, out=block)
            np.clip(block, 0, 255, out=block)
            np.copyto(rgb[start:stop], block, casting="unsafe")
        return out


def _rgb8(frame: np.ndarray) -> RGBFrame:
    # Planar Configuration 1 arrives from pydicom as a (rows, cols, 3) view; make it contiguous.
    return np.ascontiguousarray(frame, dtype=np.uint8)


def _grey8(frame: np.ndarray) -> RGBFrame:
    grey = np.ascontiguousarray(frame, dtype=np.uint8)
    return np.asarray(cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB), dtype=np.uint8)


def _palette_converter(ds: Dataset) -> RGBConverter:
    table, first = cached_palette_table(ds)

    def convert(frame: np.ndarray) -> RGBFrame:
        return lookup(table, frame, first)

    return convert


# --- MONOCHROME1 / MONOCHROME2 ----------------------------------------------------------------


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """Smallest and largest value ``bits_stored`` bits can hold (PS3.5 8.1.1)."""
    if signed:
        return -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    return 0, 2**bits_stored - 1


def _window(
    values: npt.NDArray[np.float64], center: float, width: float, function: str
) -> npt.NDArray[np.float64] | None:
    """PS3.3 C.11.2.1.2.1 / C.11.2.1.3 with the output range 0..255; ``None`` if unusable."""
    if function == "SIGMOID":
        if width <= 0:
            return None
        out: npt.NDArray[np.float64] = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        return out
    if function == "LINEAR":
        if width < 1:
            return None
        center, width = center - 0.5, width - 1.0
    elif function == "LINEAR_EXACT":
        if width <= 0:
            return None
    else:
        return None
    if width == 0:  # LINEAR with width 1 is a threshold at the centre
        return np.where(values <= center, 0.0, 255.0)
    out = ((values - center) / width + 0.5) * 255.0
    return np.clip(out, 0.0, 255.0)


def _first(value: Any) -> float:
    """First of a multi-valued DS: the first window is the default view (C.11.2.1.2)."""
    if isinstance(value, MultiValue | list | tuple):
        return float(value[0])
    return float(value)


def has_modality_transform(ds: Dataset) -> bool:
    """A Modality LUT (PS3.3 C.11.1) that changes values: a LUT, or a non-identity rescale."""
    if ds.get("ModalityLUTSequence"):
        return True
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        return float(ds.RescaleSlope) != 1.0 or float(ds.RescaleIntercept) != 0.0
    return False


def grey_curve(ds: Dataset, values: np.ndarray, domain: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """Map stored grey values to displayed 0..255 by the module's rule (see module docstring).

    Parameters
    ----------
    ds
        Header with the Image Pixel, Modality LUT and VOI LUT modules.
    values
        Stored values (any integer shape).
    domain
        The range the stored values may take; the fallback linear mapping spans its image.

    Returns
    -------
    numpy.ndarray
        uint8, same shape as ``values``; MONOCHROME1 already inverted.
    """
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    lo, hi = domain
    stored = np.clip(values, lo, hi)
    modality = has_modality_transform(ds)
    unsigned8 = (lo, hi) == (0, 255)
    y: npt.NDArray[np.float64] | None = None
    if unsigned8 and not modality:
        y = stored.astype(np.float64)  # 8-bit ultrasound grey is the displayed grey
    else:
        ends = np.array([lo, hi], dtype=np.int64)
        if modality:
            modality_values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
            ends_m = np.asarray(apply_modality_lut(ends, ds), dtype=np.float64)
        else:
            modality_values, ends_m = stored.astype(np.float64), ends.astype(np.float64)
        if "WindowCenter" in ds and "WindowWidth" in ds:
            function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
            y = _window(modality_values, _first(ds.WindowCenter), _first(ds.WindowWidth), function)
        if y is None and ds.get("VOILUTSequence"):
            item = ds.VOILUTSequence[0]
            n, first, bits = (int(v) for v in item.LUTDescriptor)
            n = n or 2**16
            index = np.clip(np.rint(modality_values), first, first + n - 1).astype(np.int64)
            y = np.asarray(apply_voi(index, ds), dtype=np.float64) * (255.0 / (2**bits - 1))
        if y is None:
            # No usable VOI: the whole representable range, linearly (C.11.1 output range).
            if ds.get("ModalityLUTSequence"):
                y_lo, y_hi = float(modality_values.min()), float(modality_values.max())
            else:
                y_lo, y_hi = float(ends_m.min()), float(ends_m.max())
            span = (y_hi - y_lo) or 1.0
            y = (modality_values - y_lo) * (255.0 / span)
    out = np.clip(np.rint(y), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        np.subtract(255, out, out=out)  # C.7.6.3.1.2: minimum sample value is white
    return out


def _grey_converter(ds: Dataset, bits_stored: int) -> RGBConverter:
    signed = ds.get("PixelRepresentation", 0) == 1
    lo, hi = stored_range(bits_stored, signed)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if (lo, hi) == (0, 255) and not has_modality_transform(ds) and photometric == "MONOCHROME2":
        return _grey8
    if bits_stored <= _MAX_TABLE_BITS:
        table = grey_curve(ds, np.arange(lo, hi + 1, dtype=np.int64), (lo, hi))

        def convert(frame: np.ndarray) -> RGBFrame:
            return _grey8(lookup(table, frame, lo))

        return convert

    def convert_deep(frame: np.ndarray) -> RGBFrame:
        # More than 16 bits is not ultrasound; computed per frame rather than tabulated.
        return _grey8(grey_curve(ds, frame.astype(np.int64), (lo, hi)))

    return convert_deep


# --- RGB deeper than 8 bits ------------------------------------------------------------------


def _deep_rgb_converter(bits_stored: int) -> RGBConverter:
    top = 2**bits_stored - 1
    if bits_stored <= _MAX_TABLE_BITS:
        table = np.rint(np.arange(top + 1, dtype=np.float64) * (255.0 / top)).astype(np.uint8)

        def convert(frame: np.ndarray) -> RGBFrame:
            return np.ascontiguousarray(lookup(table, frame, 0))

        return convert

    def convert_deep(frame: np.ndarray) -> RGBFrame:
        scaled = np.rint(np.clip(frame, 0, top).astype(np.float64) * (255.0 / top))
        return np.ascontiguousarray(scaled, dtype=np.uint8)

    return convert_deep
