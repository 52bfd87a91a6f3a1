"""Decode: every corpus file against an independent full-array reference, plus synthetic edge cases.

The reference path is pydicom's whole-array decode (``pixel_array``) followed by its own colour
functions (``convert_color_space``, ``apply_color_lut``, ``apply_modality_lut``,
``apply_windowing``); the code under test streams frames with ``iter_pixels`` and its own tables.
Lossy files are compared with the same decoding plugin, so equality is exact there too.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_windowing,
    compress,
    convert_color_space,
    pixel_array,
)
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEGExtended12Bit,
    RLELossless,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)

from pipelines.decode import DecodeError, iter_frames, read_meta
from pipelines.decode import frames as frames_module
from pipelines.decode.color import grey_curve, stored_range
from pipelines.decode.palette import is_little_endian
from pipelines.frames import UltrasoundRegion

from helpers import ultrasound_corpus

CORPUS = ultrasound_corpus()
# The corpus has known oddities (e.g. an implicit VR sequence in an explicit file).
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --- the reference: whole array, pydicom's own colour functions -------------------------------


def _bits(ds: Dataset) -> tuple[int, bool]:
    return int(ds.BitsStored), ds.get("PixelRepresentation", 0) == 1


def _reference_grey(ds: Dataset, arr: np.ndarray) -> np.ndarray:
    bits, signed = _bits(ds)
    rescaled = "RescaleSlope" in ds and (ds.RescaleSlope != 1 or ds.RescaleIntercept != 0)
    if (bits, signed, rescaled) == (8, False, False):
        grey = arr.astype(np.uint8)
    else:
        lo, hi = stored_range(bits, signed)
        y = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        if rescaled:
            lo, hi = (
                lo * ds.RescaleSlope + ds.RescaleIntercept,
                hi * ds.RescaleSlope + ds.RescaleIntercept,
            )
        if "WindowCenter" in ds:
            y = apply_windowing(y, ds)  # pydicom's output range is exactly [lo, hi]
        grey = np.clip(np.rint((y - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        grey = 255 - grey
    return np.repeat(grey[..., None], 3, axis=-1)


def _reference_palette(ds: Dataset, arr: np.ndarray) -> np.ndarray:
    if not is_little_endian(ds) and "RedPaletteColorLookupTableData" in ds:
        # pydicom's apply_color_lut reads plain OW tables as little endian: swap for it.
        for colour in ("Red", "Green", "Blue"):
            elem = ds[f"{colour}PaletteColorLookupTableData"]
            elem.value = np.frombuffer(elem.value, ">u2").astype("<u2").tobytes()
    rgb = apply_color_lut(arr, ds)[..., :3]
    if rgb.dtype == np.uint16:
        rgb = rgb if rgb.max() <= 255 else rgb >> 8
    return rgb.astype(np.uint8)


def reference_frames(path: Path) -> np.ndarray:
    """``(frames, rows, columns, 3)`` uint8 by pydicom's whole-array path."""
    ds = pydicom.dcmread(path)
    photometric = ds.PhotometricInterpretation
    shape = (int(ds.get("NumberOfFrames") or 1), ds.Rows, ds.Columns, -1)
    arr = pixel_array(ds, raw=True)  # JPEG via GDCM (pydicom's first choice) stays YCbCr
    if photometric.startswith("YBR_FULL"):
        return convert_color_space(arr, "YBR_FULL", "RGB", per_frame=True).reshape(shape)
    arr = arr.reshape(shape[:3] if ds.SamplesPerPixel == 1 else shape)
    if photometric == "PALETTE COLOR":
        return _reference_palette(ds, arr)
    if photometric.startswith("MONOCHROME"):
        return _reference_grey(ds, arr)
    bits, _ = _bits(ds)  # RGB, and J2K YBR_ICT/YBR_RCT, which every J2K plugin returns as RGB
    if bits == 8:
        return arr.astype(np.uint8)
    return np.rint(arr.astype(np.float64) * (255.0 / (2**bits - 1))).astype(np.uint8)


def _decode_all(source: Path | Dataset, **kwargs: object) -> list[np.ndarray]:
    frames = []
    for index, (frame, meta) in enumerate(iter_frames(source, **kwargs)):  # type: ignore[arg-type]
        assert meta.frame_index == index
        assert frame.dtype == np.uint8 and frame.flags.c_contiguous
        assert frame.shape == (meta.rows, meta.columns, 3)
        frames.append(frame)
    return frames


# --- the real ultrasound corpus -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_file_decodes_like_the_reference(name: str) -> None:
    path = CORPUS[name]
    frames = _decode_all(path)
    expected = reference_frames(path)
    assert len(frames) == len(expected) == read_meta(path).number_of_frames
    for index, (got, want) in enumerate(zip(frames, expected, strict=True)):
        assert np.array_equal(got, want), f"{name} frame {index} differs from the reference"


def test_corpus_covers_every_photometric_and_syntax_we_claim() -> None:
    seen = {
        (read_meta(p).photometric_interpretation, read_meta(p).transfer_syntax_uid)
        for p in CORPUS.values()
    }
    photometrics = {p for p, _ in seen}
    assert photometrics == {
        "RGB",
        "PALETTE COLOR",
        "YBR_FULL_422",
        "YBR_RCT",
        "YBR_ICT",
        "MONOCHROME2",
    }
    assert len({s for _, s in seen}) == 8  # implicit/explicit LE, BE, JPEG base/SV1, J2K x2, RLE


@pytest.mark.parametrize(
    ("name", "frames"), [("color3d_jpeg_baseline.dcm", 120), ("examples_ybr_color.dcm", 30)]
)
def test_cine_frame_counts(name: str, frames: int) -> None:
    meta = read_meta(CORPUS[name])
    assert meta.number_of_frames == frames
    assert meta.frame_time_ms == pytest.approx(33.333)
    assert meta.lossy  # JPEG Baseline
    assert sum(1 for _ in iter_frames(CORPUS[name])) == frames


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("OBXXXX1A.dcm", "OBXXXX1A_expb.dcm"),  # little vs big endian, plain 16-bit palette
        ("OBXXXX1A.dcm", "OBXXXX1A_rle.dcm"),  # native vs RLE
        ("gdcm-US-ALOKA-16.dcm", "gdcm-US-ALOKA-16_big.dcm"),  # segmented 16-bit palette, BE
        ("US1_UNCR.dcm", "US1_J2KR.dcm"),  # lossless J2K with YBR_RCT is the original RGB
        ("US1_UNCI.dcm", "US1_J2KI.dcm"),  # lossy J2K (YBR_ICT) vs its decompressed twin
        ("US1_J2KR.dcm", "examples_jpeg2k.dcm"),
        ("color-px.dcm", "color-pl.dcm"),  # Planar Configuration 0 vs 1
    ],
)
def test_twins_in_other_syntaxes_decode_identically(a: str, b: str) -> None:
    first, second = _decode_all(CORPUS[a]), _decode_all(CORPUS[b])
    assert all(np.array_equal(x, y) for x, y in zip(first, second, strict=True))


def test_sixteen_bit_palette_keeps_the_high_byte() -> None:
    frame = _decode_all(CORPUS["gdcm-US-ALOKA-16.dcm"])[0]
    # ALOKA's segmented table holds v * 257 (0x0404 -> 4), Philips' plain one v << 8.
    assert frame[240, 300].tolist() == [4, 4, 4]
    assert _decode_all(CORPUS["OBXXXX1A.dcm"])[0].max() == 255


def test_frame_indices_and_dataset_source() -> None:
    path = CORPUS["examples_ybr_color.dcm"]
    everything = _decode_all(path)
    picked = list(iter_frames(path, indices=[29, 0, 7]))
    assert [m.frame_index for _, m in picked] == [29, 0, 7]
    assert all(np.array_equal(f, everything[m.frame_index]) for f, m in picked)
    in_memory = _decode_all(pydicom.dcmread(path))
    assert all(np.array_equal(x, y) for x, y in zip(in_memory, everything, strict=True))


def test_jpeg_plugins_built_on_libjpeg_agree_exactly() -> None:
    path = CORPUS["examples_ybr_color.dcm"]
    default = _decode_all(path)  # Pillow (libjpeg-turbo) when installed: the fast path
    gdcm = _decode_all(path, decoding_plugin="gdcm")  # IJG libjpeg + pydicom's YCbCr -> RGB
    assert all(np.array_equal(x, y) for x, y in zip(default, gdcm, strict=True))
    # pylibjpeg wraps a different JPEG library: same image, different chroma upsampling.
    other = _decode_all(path, decoding_plugin="pylibjpeg")
    diffs = [np.abs(x.astype(int) - y).max() for x, y in zip(gdcm, other, strict=True)]
    assert max(diffs) <= 8


def test_a_failing_preferred_plugin_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(get_testdata_file("JPGExtended.dcm"))  # type: ignore[arg-type]
    expected = _decode_all(path)
    # Pillow cannot decode 12-bit JPEG: preferring it must not change what decodes...
    monkeypatch.setitem(frames_module._PREFERRED_PLUGINS, JPEGExtended12Bit, "pillow")
    assert all(np.array_equal(x, y) for x, y in zip(_decode_all(path), expected, strict=True))
    # ...but a plugin the caller insists on is not second-guessed.
    with pytest.raises(DecodeError, match="(?s)frame 0: cannot decode JPEG Extended.*12-bit"):
        _decode_all(path, decoding_plugin="pillow")


# --- header facts -----------------------------------------------------------------------------


def test_regions_parsed_from_aloka() -> None:
    meta = read_meta(CORPUS["gdcm-US-ALOKA-16.dcm"])
    assert (meta.manufacturer, meta.model_name) == ("ALOKA CO., LTD.", "SSD-4000")
    assert meta.burned_in_annotation  # absent: assume burned in
    left, right, bar = meta.regions
    assert left == UltrasoundRegion(
        x0=32, y0=24, x1=335, y1=415, spatial_format=1, data_type=1, units_x=3, units_y=3,
        delta_x=0.03826530650258064, delta_y=0.03826530650258064, flags=2,
        reference_x0=154, reference_y0=21,
    )  # fmt: skip
    assert (right.x0, right.x1) == (336, 639)
    assert (bar.spatial_format, bar.data_type, bar.mm_per_pixel()) == (0, 13, None)  # grey bar
    assert left.mm_per_pixel() == pytest.approx((0.3826530650258064, 0.3826530650258064))
    assert meta.image_region() == left
    assert all(r.within(meta.rows, meta.columns) for r in meta.regions)


def test_regions_across_the_corpus() -> None:
    with_regions = {name for name, p in CORPUS.items() if read_meta(p).regions}
    assert with_regions == {
        "examples_palette.dcm", "examples_ybr_color.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm",
        "OBXXXX1A.dcm", "OBXXXX1A_2frame.dcm", "OBXXXX1A_expb.dcm", "OBXXXX1A_expb_2frame.dcm",
        "OBXXXX1A_rle.dcm", "OBXXXX1A_rle_2frame.dcm", "color3d_jpeg_baseline.dcm",
        "gdcm-US-ALOKA-16.dcm", "gdcm-US-ALOKA-16_big.dcm",
    }  # fmt: skip
    epiq = read_meta(CORPUS["JPGLosslessP14SV1_1s_1f_8b.dcm"])
    region = epiq.image_region()
    assert region is not None and (region.x0, region.y0, region.x1, region.y1) == (
        14,
        38,
        1010,
        758,
    )
    assert region.mm_per_pixel() == pytest.approx((0.25476696592378157,) * 2)
    assert not epiq.burned_in_annotation  # Burned In Annotation "NO"
    # A file cropped to 350 rows after capture still claims a region down to row 518.
    cropped = read_meta(CORPUS["examples_palette.dcm"])
    assert [r.within(cropped.rows, cropped.columns) for r in cropped.regions] == [False, False]
    ob = read_meta(CORPUS["OBXXXX1A.dcm"]).regions
    assert ob[1].reference_x0 == -176 and ob[1].units_x == 4  # signed SL, seconds (M-mode/Doppler)


def test_read_meta_from_dataset_matches_path() -> None:
    path = CORPUS["US1_J2KI.dcm"]
    assert read_meta(pydicom.dcmread(path)) == read_meta(path)
    meta = read_meta(path)
    assert meta.lossy and meta.frame_time_ms is None and meta.regions == ()
    assert meta.photometric_interpretation == "YBR_ICT"


# --- syntaxes and photometrics absent from the US corpus (pydicom's own test files) -------------

EXTRA_FILES = [
    "image_dfl.dcm",  # Deflated Explicit VR Little Endian
    "JPGExtended.dcm",  # JPEG Extended, 12-bit grey
    "JPEG-LL.dcm",  # JPEG Lossless process 14, signed 16-bit
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless, signed, window
    "SC_rgb_jls_lossy_sample.dcm",  # JPEG-LS near-lossless RGB
    "MR_small_RLE.dcm",  # RLE, signed 16-bit, window
    "MR_small_bigendian.dcm",  # big endian grey with window
    "SC_ybr_full_uncompressed.dcm",  # native YBR_FULL
    "SC_ybr_full_422_uncompressed.dcm",  # native YBR_FULL_422 (subsampled)
    "SC_rgb_dcmtk_+eb+cy+s4.dcm",  # JPEG Baseline YBR_FULL
    "SC_jpeg_no_color_transform.dcm",  # JPEG Baseline RGB without colour transform
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG Lossless RGB
    "SC_rgb_rle_16bit.dcm",  # 16-bit RGB scaled by bit depth
    "GDCMJ2K_TextGBR.dcm",  # J2K YBR_RCT
    "RG3_UNCR.dcm",  # MONOCHROME1, 10-bit, window
]


@pytest.mark.parametrize("name", EXTRA_FILES)
def test_other_syntaxes_and_photometrics(name: str) -> None:
    path = Path(get_testdata_file(name))  # type: ignore[arg-type]
    frames = _decode_all(path)
    expected = reference_frames(path)
    assert len(frames) == len(expected)
    for got, want in zip(frames, expected, strict=True):
        # Windowing is float arithmetic in both paths: allow a rounding tie to go either way.
        assert np.abs(got.astype(int) - want).max() <= 1
        assert np.mean(got != want) < 1e-3


# --- synthetic datasets: grey rules, palettes, errors -------------------------------------------


def _dataset(arr: np.ndarray, photometric: str, bits: int, **attrs: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage if arr.ndim == 4 else UltrasoundImageStorage
    ds.Modality = "US"
    ds.PatientName = "Secret^Patient"
    ds.set_pixel_data(arr, photometric, bits)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def _one(ds: Dataset) -> np.ndarray:
    [(frame, _)] = list(iter_frames(ds))
    return frame


def test_monochrome1_is_inverted() -> None:
    grey = np.array([[0, 1, 128, 255]], dtype=np.uint8)
    frame = _one(_dataset(grey, "MONOCHROME1", 8))
    assert frame[..., 0].tolist() == [[255, 254, 127, 0]]
    assert np.array_equal(frame[..., 0], frame[..., 2])
    assert np.array_equal(_one(_dataset(grey, "MONOCHROME2", 8))[..., 1], grey)


def test_deep_grey_scaled_by_bit_depth_or_window() -> None:
    values = np.array([[0, 1024, 2048, 4095]], dtype=np.uint16)
    assert _one(_dataset(values, "MONOCHROME2", 12))[..., 0].tolist() == [[0, 64, 128, 255]]
    # PS3.3 C.11.2.1.2.1, LINEAR, c=1024, w=1024: [511.5, 1535.5] maps onto 0..255.
    windowed = _dataset(values, "MONOCHROME2", 12, WindowCenter=1024, WindowWidth=1024)
    assert _one(windowed)[..., 0].tolist() == [[0, 128, 255, 255]]
    windowed.PhotometricInterpretation = "MONOCHROME1"
    assert _one(windowed)[..., 0].tolist() == [[255, 127, 0, 0]]
    # Same rule on every value a table holds, checked against pydicom's windowing.
    domain = np.arange(4096)
    y = apply_windowing(domain.astype(np.float64), windowed)
    ours = grey_curve(
        _dataset(values, "MONOCHROME2", 12, WindowCenter=1024, WindowWidth=1024), domain, (0, 4095)
    )
    assert np.abs(ours.astype(int) - np.rint(y * 255 / 4095)).max() <= 1


def test_eight_bit_grey_ignores_a_nominal_window_but_honours_rescale() -> None:
    grey = np.array([[0, 100, 200]], dtype=np.uint8)
    nominal = _dataset(grey, "MONOCHROME2", 8, WindowCenter=50, WindowWidth=20)
    assert _one(nominal)[..., 0].tolist() == [[0, 100, 200]]
    signed = np.array([[-32768, 0, 32767]], dtype=np.int16)
    rescaled = _dataset(signed, "MONOCHROME2", 16, RescaleSlope=2, RescaleIntercept=10)
    assert _one(rescaled)[..., 0].tolist() == [[0, 128, 255]]


def _palette(
    entries: list[tuple[int, int, int]], first: int, bits: int, **attrs: object
) -> Dataset:
    pixels = np.array([[0, 9, 10, 11, 12, 200]], dtype=np.uint8)
    ds = _dataset(pixels, "PALETTE COLOR", 8, **attrs)
    dtype = "<u2" if bits == 16 else np.uint8
    for index, colour in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [len(entries), first, bits])
        data = np.array([e[index] for e in entries], dtype=dtype).tobytes()
        ds[f"{colour}PaletteColorLookupTableData"] = pydicom.DataElement(
            f"{colour}PaletteColorLookupTableData", "OW", data
        )
    return ds


def test_palette_first_mapped_clamping_and_16_bit_entries() -> None:
    # Entries for stored values 10, 11, 12; below 10 -> first entry, above 12 -> last.
    high_byte = _palette(
        [(0x1000, 0x2000, 0x3000), (0xFF00, 0x0000, 0x8000), (0xFFFF, 0x0101, 0)], 10, 16
    )
    frame = _one(high_byte)
    assert frame[0].tolist() == [
        [0x10, 0x20, 0x30], [0x10, 0x20, 0x30], [0x10, 0x20, 0x30],
        [0xFF, 0x00, 0x80], [0xFF, 0x01, 0x00], [0xFF, 0x01, 0x00],
    ]  # fmt: skip
    reference = _reference_palette(high_byte, high_byte.pixel_array)
    assert np.array_equal(frame, reference)
    # 8-bit values in 16-bit words (non-conformant, seen in the field) are used as they are.
    small = _one(_palette([(1, 2, 3), (4, 5, 6), (7, 8, 9)], 10, 16))
    assert small[0, 3].tolist() == [4, 5, 6]
    eight = _one(_palette([(1, 2, 3), (4, 5, 6), (7, 8, 9)], 10, 8))
    assert eight[0, 5].tolist() == [7, 8, 9]


def test_big_endian_palette_written_at_test_time(tmp_path: Path) -> None:
    ds = _palette([(0x1000, 0x2000, 0x3000), (0xFF00, 0, 0x8000), (0xFFFF, 0x0101, 0)], 10, 16)
    little = _one(ds)
    for colour in ("Red", "Green", "Blue"):  # OW values are held in the file's byte order
        elem = ds[f"{colour}PaletteColorLookupTableData"]
        elem.value = np.frombuffer(elem.value, "<u2").astype(">u2").tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    path = tmp_path / "be.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert np.array_equal(_decode_all(path)[0], little)


def test_ybr_full_native_matches_the_standard_equations() -> None:
    # PS3.3 C.7.6.3.1.2: Y=128, Cb=128, Cr=255 is a saturated red-ish grey.
    ybr = np.array([[[128, 128, 128], [128, 128, 255], [255, 128, 128]]], dtype=np.uint8)
    frame = _one(_dataset(ybr, "YBR_FULL", 8))
    assert frame[0, 0].tolist() == [128, 128, 128] and frame[0, 2].tolist() == [255, 255, 255]
    r, g, b = frame[0, 1].astype(int)
    assert (r, g, b) == (255, 37, 128)  # R = Y + 1.402 (Cr-128) clipped, G = Y - 0.714 (Cr-128)


# --- streaming --------------------------------------------------------------------------------


def _cine(path: Path, frames: int, syntax: str | None = None) -> np.ndarray:
    rng = np.random.default_rng(7)
    arr = (
        rng.integers(0, 64, (frames, 256, 256), dtype=np.uint8)
        + np.arange(frames, dtype=np.uint8)[:, None, None]
    )
    ds = _dataset(arr, "MONOCHROME2", 8)
    if syntax:
        compress(ds, syntax, encoding_plugin="gdcm")
    ds.save_as(path, enforce_file_format=True)
    return arr


@pytest.mark.parametrize("syntax", [None, RLELossless], ids=["native", "rle"])
def test_cine_is_streamed_not_loaded(tmp_path: Path, syntax: str | None) -> None:
    path = tmp_path / "cine.dcm"
    arr = _cine(path, 200, syntax)
    rgb_frame = 256 * 256 * 3
    assert path.stat().st_size > 60 * rgb_frame  # the whole loop would blow the bound below
    tracemalloc.start()
    try:
        count = 0
        for frame, meta in iter_frames(path):
            assert frame[7, 9, 0] == arr[meta.frame_index, 7, 9]
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 200
    assert peak < 5 * rgb_frame, f"peak {peak} B while streaming, {peak / rgb_frame:.1f} frames"


def test_frames_are_produced_lazily(tmp_path: Path) -> None:
    path = tmp_path / "cine.dcm"
    arr = _cine(path, 50)
    frames = iter_frames(path)
    first, meta = next(frames)
    assert meta.frame_index == 0 and np.array_equal(first[..., 1], arr[0])
    frames.close()  # stopping early releases the file
    path.unlink()


# --- errors -----------------------------------------------------------------------------------


def test_decode_errors_name_the_instance_not_the_patient(tmp_path: Path) -> None:
    ds = _dataset(np.zeros((4, 4), np.uint8), "MONOCHROME2", 8)
    uid = ds.SOPInstanceUID
    ds.PhotometricInterpretation = "CMYK"
    with pytest.raises(DecodeError, match="Photometric Interpretation 'CMYK'") as info:
        list(iter_frames(ds))
    assert info.value.sop_instance_uid == uid and uid in str(info.value)
    assert "Secret" not in str(info.value)
    assert isinstance(info.value, ValueError)

    ds.PhotometricInterpretation = "RGB"
    with pytest.raises(DecodeError, match="Samples per Pixel is 1 but RGB requires 3"):
        list(iter_frames(ds))

    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = ds.PixelData[:10]  # truncated
    with pytest.raises(DecodeError, match="frame 0: cannot decode"):
        list(iter_frames(ds))
    with pytest.raises(DecodeError, match="frame index 3 outside 0..0"):
        list(iter_frames(ds, indices=[3]))

    no_pixels = tmp_path / "header.dcm"
    del ds.PixelData
    ds.save_as(no_pixels, enforce_file_format=True)
    with pytest.raises(DecodeError, match="cannot decode"):
        list(iter_frames(no_pixels))

    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(DecodeError, match="not a DICOM Part 10 file"):
        read_meta(junk)
    with pytest.raises(FileNotFoundError):
        read_meta(tmp_path / "missing.dcm")


def test_unsupported_syntax_and_broken_codestream() -> None:
    ds = _dataset(np.zeros((4, 4), np.uint8), "MONOCHROME2", 8)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2: no pixel decoder
    with pytest.raises(DecodeError, match="has no pixel data decoder"):
        list(iter_frames(ds))
    broken = Path(get_testdata_file("JPEG-lossy.dcm"))  # type: ignore[arg-type]
    with pytest.raises(DecodeError, match=r"frame 0: cannot decode JPEG Extended"):
        list(iter_frames(broken))
