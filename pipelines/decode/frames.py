"""Read an instance's header into :class:`FrameMeta` and stream its frames as RGB uint8.

Frames are streamed from the file itself by pydicom's decoder (``Decoder.iter_array``, as
:func:`pydicom.pixels.iter_pixels` does): the header is read up to Pixel Data, then each native
frame is seeked or the encapsulated fragments are walked (PS3.5 A.4), one frame decoded at a time
(all frames in order: one walk over the fragments, not one per frame). A 1,000-frame cine therefore
costs a few frames of memory, not the whole loop. Native 8-bit frames whose bytes are their samples
(uncompressed RGB, grey and palette ultrasound) are read straight into their arrays instead, without
the decoder's per-frame overhead (the same pixels: tested). The one exception
is the Deflated transfer syntax (PS3.5 A.5): the whole dataset is one zlib stream that cannot be
seeked, so it is inflated once in memory (deflate is rare for images and its pixels are native, so
frames are still produced one by one).

Frames come from pydicom *raw*, with the Image Pixel properties the decoder settled on; frames it
reports as YBR_FULL / YBR_FULL_422 are converted to RGB here, bit for bit as pydicom would
(:class:`pipelines.decode.color.YBRConverter`), but ~3× faster.

Most ultrasound is 8-bit JPEG Baseline YBR_FULL_422, and there the colour conversion is left to
libjpeg-turbo, as DICOM toolkits leave it to their libjpeg (dcmtk's ``dcmj2pnm``): Pillow decodes
each frame's JPEG stream straight to RGB (:func:`_jpeg_rgb_frames`). That is dcmtk's RGB exactly
and differs from pydicom's float conversion by at most one level in a few samples per million
(tested), for ~1.6 ms less per 800 x 600 frame.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, Final

import cv2
import numpy as np
from PIL import Image, ImageFile
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels import as_pixel_options, get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)

from pipelines.decode.color import RGBFrame, YBRConverter, rgb_converter
from pipelines.decode.regions import parse_regions
from pipelines.errors import DecodeError
from pipelines.frames import FrameMeta

log = logging.getLogger(__name__)

#: A file path, or a dataset already in memory (e.g. straight from a C-STORE).
Source = str | os.PathLike[str] | Dataset

#: Transfer syntaxes whose pixels differ from the original (PS3.5 8.2, 10.x).
LOSSY_TRANSFER_SYNTAXES: Final = frozenset(
    {JPEGBaseline8Bit, JPEGExtended12Bit, JPEG2000, JPEGLSNearLossless, HTJ2K}
)

#: Plugins tried first for a transfer syntax when installed. libjpeg-turbo through Pillow decodes
#: and colour-converts JPEG Baseline in one pass: ~2x faster than GDCM followed by pydicom's
#: float YCbCr conversion (~5 vs ~15 ms for 800 x 600), and identical on the corpus (tested).
_PREFERRED_PLUGINS: Final[dict[str, str]] = {JPEGBaseline8Bit: "pillow"}

#: What pydicom and its plugins raise on bad pixel data. OSError (missing or unreadable file)
#: is deliberately absent: it is the environment's fault and a worker may retry it.
_DECODER_FAILURES: Final = (
    ValueError,
    RuntimeError,
    NotImplementedError,
    AttributeError,
    KeyError,
    IndexError,
    TypeError,
    EOFError,
    struct.error,
    zlib.error,
)


def _read_header(source: Source) -> Dataset:
    if isinstance(source, Dataset):
        return source
    return _read_file_header(source).header


@dataclass(frozen=True, slots=True)
class _FileHeader:
    """A file's header, read once, and where its pixel data element starts."""

    path: str | os.PathLike[str]
    header: Dataset
    pixel_offset: int


def _read_file_header(path: str | os.PathLike[str]) -> _FileHeader:
    try:
        with open(path, "rb") as f:
            header = dcmread(f, stop_before_pixels=True)  # stops at the pixel data element
            return _FileHeader(path, header, f.tell())
    except InvalidDicomError as exc:
        # The path may carry patient data; the reason from pydicom does not.
        raise DecodeError(f"not a DICOM Part 10 file ({exc})") from exc


def _transfer_syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(value)) if value else None


def _frame_time_ms(ds: Dataset) -> float | None:
    try:
        if ds.get("FrameTime") not in (None, ""):
            return float(ds.FrameTime)  # (0018,1063), ms, PS3.3 C.7.6.5.1.1
        if ds.get("CineRate") not in (None, "", 0):
            return 1000.0 / float(ds.CineRate)  # (0018,0040), frames per second
    except (TypeError, ValueError):
        pass
    return None


def _meta_from_header(ds: Dataset) -> FrameMeta:
    uid = str(ds.get("SOPInstanceUID", "") or "")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames_value: Any = ds.get("NumberOfFrames")
        frames = int(frames_value) if frames_value not in (None, "") else 1
    except (AttributeError, TypeError, ValueError) as exc:
        raise DecodeError(
            f"Rows/Columns/Number of Frames (0028,0010/0011/0008) missing or invalid: {exc}",
            sop_instance_uid=uid,
        ) from exc
    if rows < 1 or columns < 1 or frames < 1:
        raise DecodeError(
            f"image of {rows} x {columns} pixels and {frames} frames; each must be at least 1",
            sop_instance_uid=uid,
        )
    syntax = _transfer_syntax(ds)
    burned_in = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    return FrameMeta(
        sop_instance_uid=uid,
        frame_index=0,
        number_of_frames=frames,
        rows=rows,
        columns=columns,
        photometric_interpretation=str(ds.get("PhotometricInterpretation", "") or "").strip(),
        manufacturer=str(ds.get("Manufacturer", "") or "").strip(),
        model_name=str(ds.get("ManufacturerModelName", "") or "").strip(),
        # PS3.3 C.7.6.1.1.5 / C.8.5.6: only an explicit "NO" clears it; unknown means scrub.
        burned_in_annotation=burned_in != "NO",
        regions=parse_regions(ds),
        transfer_syntax_uid=str(syntax or ""),
        lossy=str(ds.get("LossyImageCompression", "") or "").strip() == "01"
        or syntax in LOSSY_TRANSFER_SYNTAXES,
        frame_time_ms=_frame_time_ms(ds),
    )


def read_meta(source: Source) -> FrameMeta:
    """Header facts every later stage needs, without reading the pixel data.

    Parameters
    ----------
    source
        Path to a DICOM Part 10 file, or a dataset in memory.

    Returns
    -------
    FrameMeta
        The template for frame 0; :func:`iter_frames` yields it with ``frame_index`` set.
        Regions come from the Sequence of Ultrasound Regions (0018,6011).

    Raises
    ------
    DecodeError
        Not DICOM, or no usable Rows/Columns/Number of Frames.
    OSError
        The file cannot be read.
    """
    return _meta_from_header(_read_header(source))


def _check_decodable(header: Dataset, meta: FrameMeta) -> UID:
    syntax = _transfer_syntax(header)
    if syntax is None:
        raise DecodeError(
            "no (0002,0010) Transfer Syntax UID: the dataset is not in the DICOM File Format",
            sop_instance_uid=meta.sop_instance_uid,
        )
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise DecodeError(
            f"transfer syntax {syntax.name} ({syntax}) has no pixel data decoder",
            sop_instance_uid=meta.sop_instance_uid,
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise DecodeError(
            f"transfer syntax {syntax.name} needs a decoding plugin; none is installed ({missing})",
            sop_instance_uid=meta.sop_instance_uid,
        )
    return syntax


#: The pixel data elements and their keywords in pydicom's decoding options (PS3.3 C.7.6.3).
_PIXEL_KEYWORDS: Final = {
    (0x7FE0, 0x0008): "FloatPixelData",
    (0x7FE0, 0x0009): "DoubleFloatPixelData",
    (0x7FE0, 0x0010): "PixelData",
}
_YBR: Final = frozenset({"YBR_FULL", "YBR_FULL_422"})


def _pixel_options(f: BinaryIO, header: Dataset, syntax: UID) -> tuple[dict[str, Any], int]:
    """Decoding options and value length of the pixel data element ``f`` is positioned at; leave
    ``f`` at its value.

    The element header is PS3.5 7.1.2: tag, then (explicit VR) the VR, two reserved bytes and a
    32-bit length, or (implicit VR) the 32-bit length.
    """
    opts = as_pixel_options(header)
    opts["transfer_syntax_uid"] = syntax
    order = "<" if syntax.is_little_endian else ">"
    data = f.read(8)
    if len(data) != 8:
        raise ValueError("the dataset ends before its Pixel Data (7FE0,0010)")
    group, element = struct.unpack(f"{order}HH", data[:4])
    if (group, element) not in _PIXEL_KEYWORDS:
        raise ValueError(f"no Pixel Data: the dataset continues with ({group:04X},{element:04X})")
    opts["pixel_keyword"] = _PIXEL_KEYWORDS[(group, element)]
    if syntax.is_implicit_VR:
        (length,) = struct.unpack(f"{order}L", data[4:])
    else:
        opts["pixel_vr"] = data[4:6].decode("ascii", "replace")
        tail = f.read(4)  # the 32-bit length that follows OB/OW/OF/OD's reserved bytes
        length = struct.unpack(f"{order}L", tail)[0] if len(tail) == 4 else 0
    return opts, length


#: Native little-endian syntaxes whose 8-bit frames :func:`_plain_frames` reads itself.
_PLAIN_SYNTAXES: Final = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
#: Photometric Interpretations whose native 8-bit frame is its bytes, one sample after another
#: (YBR_FULL_422 is excluded: natively it is stored subsampled, PS3.3 C.7.6.3.1.2).
_PLAIN_PHOTOMETRIC: Final = frozenset(
    {"RGB", "YBR_FULL", "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"}
)
_UNDEFINED_LENGTH: Final = 0xFFFFFFFF


def _frame_shape(opts: dict[str, Any], syntax: UID, length: int) -> tuple[int, ...] | None:
    """The shape of one native frame when its bytes are exactly its samples; else ``None``.

    That is the common uncompressed ultrasound case — 8-bit unsigned samples, interleaved
    (Planar Configuration 0) when there are three, in a little-endian syntax, with a defined
    element length that holds every frame — and the only one read without pydicom's decoder.
    """
    samples = opts.get("samples_per_pixel")
    photometric = str(opts.get("photometric_interpretation", "")).strip().upper()
    plain = (
        syntax in _PLAIN_SYNTAXES
        and opts.get("pixel_keyword") == "PixelData"
        and opts.get("bits_allocated") == 8
        and opts.get("bits_stored") == 8
        and opts.get("pixel_representation") == 0
        and photometric in _PLAIN_PHOTOMETRIC
        and (samples == 1 or (samples == 3 and opts.get("planar_configuration", 0) == 0))
    )
    if not plain:
        return None
    shape = (int(opts["rows"]), int(opts["columns"])) + ((3,) if samples == 3 else ())
    frames = int(opts.get("number_of_frames") or 1)
    if length == _UNDEFINED_LENGTH or length < frames * int(np.prod(shape)):
        return None
    return shape


def _plain_frames(
    f: io.BufferedReader, shape: tuple[int, ...], indices: list[int], photometric: str
) -> Generator[tuple[np.ndarray, str], None, None]:
    """Native 8-bit frames read straight from the file into their arrays (one copy, no decoder):
    what pydicom's decoder yields for them, raw, at a fraction of its per-frame overhead."""
    start = f.tell()
    size = int(np.prod(shape))
    for index in indices:
        frame = np.empty(shape, np.uint8)
        f.seek(start + index * size)
        if f.readinto(frame.reshape(-1).data) != size:
            raise EOFError(f"the file ends inside frame {index}")
        yield frame, photometric


def _pydicom_indices(indices: list[int], options: dict[str, Any]) -> list[int] | None:
    """``None`` (every frame, in order) when that is what ``indices`` asks for, else ``indices``.

    Asked for frames by index, pydicom's decoder walks an encapsulated cine's fragment items
    from the first for every frame, which is quadratic in the cine's length (~0.4 ms per frame
    at 120 frames); asked for every frame, it walks them once, still one frame at a time.
    """
    total = int(options.get("number_of_frames") or 1)
    return None if indices == list(range(total)) else indices


#: Component identifiers libjpeg takes for an RGB (not YCbCr) stream without JFIF or Adobe markers.
_RGB_COMPONENT_IDS: Final = (ord("R"), ord("G"), ord("B"))


def _jpeg_rgb_options(options: dict[str, Any], syntax: UID, plugin: str) -> bool:
    """Whether frames with these decoding ``options`` go to :func:`_jpeg_rgb_frames`: 8-bit JPEG
    Baseline stored as YCbCr (YBR_FULL_422 / YBR_FULL, PS3.5 8.2.1), while Pillow is the plugin."""
    photometric = str(options.get("photometric_interpretation", "")).strip().upper()
    return (
        plugin == "pillow"
        and syntax == JPEGBaseline8Bit
        and options.get("pixel_keyword") == "PixelData"
        and options.get("samples_per_pixel") == 3
        and options.get("bits_allocated") == 8
        and options.get("bits_stored") == 8
        and photometric in _YBR
    )


def _decode_rgb(image: ImageFile.ImageFile, stream: bytes) -> np.ndarray:
    """Decode the opened JPEG ``image`` (``stream`` holds all of it) to a new, writable,
    C-contiguous ``(rows, columns, 3)`` RGB array.

    Pillow keeps RGB as four bytes a pixel, so ``tobytes`` repacks it in 64 KiB pieces, joins them
    and a writable copy needs a third pass (~0.9 ms for 800 x 600). Here libjpeg-turbo decodes
    into an RGBX array of ours (``frombuffer`` shares it) and one OpenCV pass drops the padding:
    the same samples (tested), ~0.3 ms less.
    """
    (tile,) = image.tile
    columns, rows = image.size
    rgbx = np.empty((rows, columns, 4), np.uint8)
    target = Image.frombuffer("RGBX", (columns, rows), rgbx, "raw", "RGBX", 0, 1)
    args = tile.args if isinstance(tile.args, tuple) else ()  # (rawmode, jpeg mode, ...)
    # Raises ValueError on a stream that ends early (Pillow's ``load`` says OSError).
    target.frombytes(stream[tile.offset :], "jpeg", "RGBX", *args[1:])
    return cv2.cvtColor(rgbx, cv2.COLOR_RGBA2RGB)


def _jpeg_rgb_frames(
    encapsulated: Callable[[], bytes | BinaryIO], options: dict[str, Any], indices: list[int]
) -> Generator[tuple[np.ndarray, str], None, int]:
    """8-bit YCbCr JPEG frames decoded by libjpeg-turbo straight to RGB, one walk over the
    encapsulated fragments (PS3.5 A.4) while ``indices`` increase, a new walk when they go back.

    ``encapsulated`` gives the pixel data value from its Basic Offset Table item on (the bytes, or
    the file rewound there). Each frame is served while its stream is plain YCbCr: no Adobe APP14
    marker and no ``R``, ``G``, ``B`` component identifiers, the streams pydicom's own Pillow
    plugin also treats as YCbCr. Returns how many of ``indices`` it served; the caller hands the
    rest (an RGB stream, fragments that run out) to pydicom's decoder.
    """
    rows, columns = int(options["rows"]), int(options["columns"])
    total = int(options.get("number_of_frames") or 1)
    served = 0
    while served < len(indices):
        walk_again = False
        encoded = generate_frames(
            encapsulated(), number_of_frames=total, extended_offsets=options.get("extended_offsets")
        )
        for index, src in enumerate(encoded):
            if index < indices[served]:
                continue  # read, not decoded (a walk stops as soon as the indices go back)
            try:
                image = Image.open(io.BytesIO(src), formats=("JPEG",))
                layers = getattr(image, "layer", [])
                if (
                    image.mode != "RGB"
                    or len(image.tile) != 1
                    or image.size != (columns, rows)
                    or "adobe_transform" in image.info
                    or tuple(layer[0] for layer in layers) == _RGB_COMPONENT_IDS
                ):
                    return served
                frame = _decode_rgb(image, src)
            except (OSError, ValueError) as exc:  # Pillow's words for a bad stream
                raise RuntimeError(f"Pillow cannot decode frame {index}: {exc}") from exc
            yield frame, "RGB"
            served += 1
            if served == len(indices):
                break
            if indices[served] <= index:
                walk_again = True  # indices go back: walk again from the first fragment
                break
        if not walk_again:
            return served  # every index asked for, or the fragments ran out first
    return served


def _raw_frames(
    source: _FileHeader | Dataset, indices: list[int], plugin: str
) -> Generator[tuple[np.ndarray, str], None, None]:
    """``(frame, photometric interpretation of the frame)`` as pydicom's decoder yields them raw,
    except 8-bit YCbCr JPEG Baseline, yielded as RGB when Pillow decodes (:func:`_jpeg_rgb_frames`).
    """
    if isinstance(source, Dataset):
        syntax = UID(str(source.file_meta.TransferSyntaxUID))
        options = as_pixel_options(source)
        keyword = "PixelData" if "PixelData" in source else ""
        jpeg = _jpeg_rgb_options({**options, "pixel_keyword": keyword}, syntax, plugin)
        pixel_data = source.PixelData if jpeg else b""
        yield from _decoder_frames(
            syntax, options, indices, plugin, jpeg, lambda: pixel_data, lambda: source
        )
        return
    with open(source.path, "rb") as f:
        f.seek(source.pixel_offset)
        syntax = UID(str(source.header.file_meta.TransferSyntaxUID))
        options, length = _pixel_options(f, source.header, syntax)
        shape = _frame_shape(options, syntax, length)
        if shape is not None:
            photometric = str(options["photometric_interpretation"])
            yield from _plain_frames(f, shape, indices, photometric)
            return
        value = f.tell()

        def rewound() -> BinaryIO:
            f.seek(value)
            return f

        jpeg = _jpeg_rgb_options(options, syntax, plugin)
        yield from _decoder_frames(syntax, options, indices, plugin, jpeg, rewound, rewound)


def _decoder_frames(
    syntax: UID,
    options: dict[str, Any],
    indices: list[int],
    plugin: str,
    jpeg: bool,
    encapsulated: Callable[[], bytes | BinaryIO],
    decoder_source: Callable[[], Dataset | BinaryIO],
) -> Generator[tuple[np.ndarray, str], None, None]:
    """The frames of ``indices``: YCbCr JPEG ones from libjpeg-turbo while ``jpeg`` streams allow
    (:func:`_jpeg_rgb_frames`), the rest raw from pydicom's decoder, reading ``decoder_source()``.
    """
    if jpeg:
        served = yield from _jpeg_rgb_frames(encapsulated, options, indices)
        if served == len(indices):
            return
        indices = indices[served:]
    frames = get_decoder(syntax).iter_array(
        decoder_source(),
        indices=_pydicom_indices(indices, options),
        raw=True,
        decoding_plugin=plugin,
        **options,
    )
    for arr, properties in frames:
        yield arr, str(properties.get("photometric_interpretation", ""))


def _preferred_plugin(syntax: UID) -> str:
    name = _PREFERRED_PLUGINS.get(syntax, "")
    return name if name in get_decoder(syntax).available_plugins else ""


def _decoded(
    pixels: _FileHeader | Dataset, todo: list[int], plugin: str, *, fallback: bool
) -> Generator[tuple[int, np.ndarray, str], None, None]:
    """``(frame index, raw frame, its photometric interpretation)`` for each of ``todo``.

    With ``fallback``, a frame the (preferred) ``plugin`` rejects is retried, with the rest, in
    pydicom's own plugin order: a preference may change speed, never what decodes.
    """
    position = 0
    while position < len(todo):
        frames = _raw_frames(pixels, todo[position:], plugin)
        try:
            for raw, photometric in frames:
                yield todo[position], raw, photometric
                position += 1
            if position < len(todo):  # every frame in one pass: the fragments ran out early
                raise EOFError(f"the pixel data ends before frame {todo[position]}")
            return
        except _DECODER_FAILURES as exc:
            if not (fallback and plugin):
                raise _FrameFailure(todo[position]) from exc
            log.debug("plugin %s failed on frame %d; trying all plugins", plugin, todo[position])
            plugin = ""
        finally:
            frames.close()  # closes the file pydicom opened, even when the caller stops early


class _FrameFailure(Exception):
    """Internal: which frame failed; the cause is chained."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def iter_frames(
    source: Source,
    *,
    indices: Iterable[int] | None = None,
    decoding_plugin: str = "",
) -> Generator[tuple[RGBFrame, FrameMeta], None, None]:
    """Stream every frame (or the chosen ones) as RGB uint8 with its metadata.

    Parameters
    ----------
    source
        Path to a DICOM Part 10 file (streamed: memory stays at a few frames however long the
        cine), or a dataset in memory (its pixel data is already loaded; frames are still
        decoded one at a time).
    indices
        0-based frames to yield, in this order; all frames when ``None``. Useful to sample a
        cine without decoding what is skipped (native data is seeked; encapsulated fragments
        of skipped frames are read but not decoded).
    decoding_plugin
        Force one pydicom decoding plugin (``"gdcm"``, ``"pylibjpeg"``, ``"pillow"``, ...).
        By default JPEG Baseline goes to Pillow when installed (see ``_PREFERRED_PLUGINS``)
        and everything else to pydicom's plugins in their documented order.

    Yields
    ------
    frame : numpy.ndarray
        C-contiguous ``(rows, columns, 3)`` uint8 RGB; see :mod:`pipelines.decode.color` for
        how each Photometric Interpretation gets there.
    meta : FrameMeta
        :func:`read_meta`'s template with ``frame_index`` set.

    Raises
    ------
    DecodeError
        Unsupported transfer syntax, photometric interpretation or bit depth, missing pixel
        data, or a frame the codec rejects (the error names the frame).
    OSError
        The file cannot be read.
    """
    pixels: _FileHeader | Dataset
    if isinstance(source, Dataset):
        header = pixels = source
    else:
        pixels = _read_file_header(source)
        header = pixels.header
    meta = _meta_from_header(header)
    syntax = _check_decodable(header, meta)
    convert = rgb_converter(header)
    from_ybr = YBRConverter()
    if not isinstance(source, Dataset) and syntax == DeflatedExplicitVRLittleEndian:
        pixels = dcmread(source)  # PS3.5 A.5: one zlib stream, nothing to seek in
    todo = list(indices) if indices is not None else list(range(meta.number_of_frames))
    for index in todo:
        if not 0 <= index < meta.number_of_frames:
            raise DecodeError(
                f"frame index {index} outside 0..{meta.number_of_frames - 1}",
                sop_instance_uid=meta.sop_instance_uid,
            )
    preferred = "" if decoding_plugin else _preferred_plugin(syntax)
    frames = _decoded(pixels, todo, decoding_plugin or preferred, fallback=bool(preferred))
    try:
        while True:
            try:
                index, raw, photometric = next(frames)
            except StopIteration:
                return
            except _FrameFailure as failure:
                cause = failure.__cause__
                raise DecodeError(
                    f"cannot decode {syntax.name} pixel data: {type(cause).__name__}: {cause}",
                    sop_instance_uid=meta.sop_instance_uid,
                    frame_index=failure.index,
                ) from cause
            try:
                if photometric.strip().upper() in _YBR:
                    raw = from_ybr(raw)  # what pydicom does without raw=True, PS3.3 C.7.6.3.1.2
                rgb = convert(raw)
            except _DECODER_FAILURES as exc:
                raise DecodeError(
                    f"cannot convert {meta.photometric_interpretation} to RGB: {exc}",
                    sop_instance_uid=meta.sop_instance_uid,
                    frame_index=index,
                ) from exc
            yield rgb, replace(meta, frame_index=index)
    finally:
        frames.close()
