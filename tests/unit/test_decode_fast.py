"""Decode's fast paths against what they replace: native 8-bit frames read straight from the file
against pydicom's decoder, and the block-wise YBR_FULL -> RGB conversion against pydicom's
``convert_color_space`` on every input, in frame shapes that end inside a block."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space, get_decoder
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from pipelines.decode import DecodeError, YBRConverter, iter_frames
from pipelines.decode import frames as frames_module

from helpers import dcmtk, ultrasound_corpus

CORPUS = ultrasound_corpus()
# The corpus has known oddities (e.g. an implicit VR sequence in an explicit file).
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _plain_shape(path: Path) -> tuple[int, ...] | None:
    """What the fast path decides for ``path``: the frame shape it reads, or ``None``."""
    header = frames_module._read_file_header(path)
    syntax = frames_module._transfer_syntax(header.header)
    assert syntax is not None
    with open(path, "rb") as f:
        f.seek(header.pixel_offset)
        options, length = frames_module._pixel_options(f, header.header, syntax)
    return frames_module._frame_shape(options, syntax, length)


def _pydicom_raw(path: Path) -> list[np.ndarray]:
    """Every frame as pydicom's own decoder yields it raw (the path the fast one replaces)."""
    ds = pydicom.dcmread(path)
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    return [arr for arr, _ in decoder.iter_array(ds, raw=True)]


def _raw_frames(path: Path, indices: list[int]) -> list[np.ndarray]:
    header = frames_module._read_file_header(path)
    return [arr for arr, _ in frames_module._raw_frames(header, indices, "")]


def test_plain_native_frames_are_pydicoms_frames() -> None:
    taken = []
    for name, path in sorted(CORPUS.items()):
        if _plain_shape(path) is None:
            continue
        taken.append(name)
        expected = _pydicom_raw(path)
        got = _raw_frames(path, list(range(len(expected))))
        assert len(got) == len(expected), name
        for ours, theirs in zip(got, expected, strict=True):
            assert ours.dtype == np.uint8 and ours.flags.c_contiguous and ours.flags.writeable
            assert np.array_equal(ours, theirs), name
        backwards = _raw_frames(path, list(range(len(expected)))[::-1])  # seeks, not streams
        assert all(np.array_equal(a, b) for a, b in zip(backwards, expected[::-1], strict=True))
    # RGB, palette and multi-frame palette files of the corpus go through it...
    assert {"US1_UNCR.dcm", "examples_palette.dcm", "OBXXXX1A_2frame.dcm"} <= set(taken)


@pytest.mark.parametrize(
    "name",
    [
        "color-pl.dcm",  # Planar Configuration 1
        "OBXXXX1A_expb.dcm",  # big endian
        "gdcm-US-ALOKA-16.dcm",  # 16-bit
        "color3d_jpeg_baseline.dcm",  # encapsulated
    ],
)
def test_everything_else_goes_to_pydicoms_decoder(name: str) -> None:
    assert _plain_shape(CORPUS[name]) is None


def _native_file(
    path: Path, frames: np.ndarray, photometric: str, syntax: str = ExplicitVRLittleEndian
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "US"
    ds.set_pixel_data(frames, photometric, 8)
    ds.save_as(path, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian)
    return ds


@pytest.mark.parametrize(
    ("photometric", "syntax"),
    [
        ("RGB", ExplicitVRLittleEndian),
        ("MONOCHROME2", ImplicitVRLittleEndian),
        ("YBR_FULL", ExplicitVRLittleEndian),
    ],
)
def test_multi_frame_native_files(tmp_path: Path, photometric: str, syntax: str) -> None:
    rng = np.random.default_rng(7)
    shape = (5, 31, 17) + ((3,) if photometric != "MONOCHROME2" else ())
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "cine.dcm"
    ds = _native_file(path, pixels, photometric, syntax)
    assert _plain_shape(path) == shape[1:]
    # Frames are pydicom's raw frames, and decode as pydicom's full path does.
    raw = _raw_frames(path, [4, 0, 2])
    assert all(np.array_equal(a, pixels[i]) for a, i in zip(raw, [4, 0, 2], strict=True))
    reference = pydicom.dcmread(path).pixel_array  # converts YBR_FULL to RGB itself
    if photometric == "MONOCHROME2":
        reference = np.repeat(reference[..., None], 3, axis=-1)
    decoded = [frame for frame, _ in iter_frames(path)]
    from_memory = [frame for frame, _ in iter_frames(ds)]
    assert all(np.array_equal(a, b) for a, b in zip(decoded, reference, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(decoded, from_memory, strict=True))


def test_a_truncated_native_file_fails_on_the_missing_frame(tmp_path: Path) -> None:
    pixels = np.zeros((3, 20, 20, 3), np.uint8)
    path = tmp_path / "short.dcm"
    _native_file(path, pixels, "RGB")
    path.write_bytes(path.read_bytes()[:-100])  # the element still declares three frames
    frames = iter_frames(path)
    next(frames), next(frames)
    with pytest.raises(DecodeError, match="frame 2: cannot decode") as info:
        next(frames)
    assert info.value.frame_index == 2


def test_ybr_conversion_in_frames_that_end_inside_a_block() -> None:
    """Every (Y, Cb, Cr), as frames whose pixel count is no multiple of the block (and views
    that are not contiguous): equal to pydicom's conversion."""
    convert = YBRConverter()
    cb, cr = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    for y0 in range(0, 256, 32):
        y = np.arange(y0, y0 + 32)[:, None, None]
        ybr = np.stack(np.broadcast_arrays(y, cb[None], cr[None]), axis=-1).astype(np.uint8)
        ybr = ybr.reshape(2048, 1024, 3)
        for frame in (ybr[:, :1023], ybr[:2047]):
            expected = convert_color_space(np.ascontiguousarray(frame), "YBR_FULL", "RGB")
            got = convert(frame)
            assert got.flags.c_contiguous and got.shape == frame.shape
            assert np.array_equal(got, expected), f"Y {y0}..{y0 + 31}"
    # The dropped column / row are covered by the whole frames in test_analyze.


def _jpeg_cine(path: Path, frames: int) -> Dataset:
    from pipelines.phantom import make_phantom
    from pipelines.phantom.dicom import write_phantom

    samples = [make_phantom(seed, "heart", style="colour") for seed in range(frames)]
    write_phantom(path, samples, transfer_syntax=JPEGBaseline8Bit)
    return pydicom.dcmread(path)


def test_every_frame_in_one_pass_equals_frame_by_frame(tmp_path: Path) -> None:
    """All frames, in order, come from one walk over the fragments; the same pixels as frames
    asked one by one (pydicom's indexed path) and as the reference."""
    path = tmp_path / "cine.dcm"
    _jpeg_cine(path, 3)
    header = frames_module._read_file_header(path)
    options = {"number_of_frames": 3}
    assert frames_module._pydicom_indices([0, 1, 2], options) is None
    assert frames_module._pydicom_indices([0, 2], options) == [0, 2]
    assert frames_module._pydicom_indices([2, 1, 0], options) == [2, 1, 0]
    for plugin in ("gdcm", "pillow"):  # pydicom's decoder; the libjpeg-turbo RGB path
        in_one_pass = [arr for arr, _ in frames_module._raw_frames(header, [0, 1, 2], plugin)]
        one_by_one = [
            arr for i in range(3) for arr, _ in frames_module._raw_frames(header, [i], plugin)
        ]
        assert all(np.array_equal(a, b) for a, b in zip(in_one_pass, one_by_one, strict=True))
    decoded = [frame for frame, _ in iter_frames(path)]
    for order in ([2, 1, 0], [1, 2, 0], [0, 0, 2]):  # back and forth: a new walk each time
        picked = [frame for frame, _ in iter_frames(path, indices=order)]
        assert all(np.array_equal(decoded[i], f) for i, f in zip(order, picked, strict=True))


def _dcmtk_rgb(path: Path, tmp_path: Path) -> list[np.ndarray]:
    """Every frame as dcmtk's ``dcmj2pnm`` writes it (its libjpeg converts YCbCr to RGB)."""
    from PIL import Image

    subprocess.run([dcmtk("dcmj2pnm"), "+Fa", "+op", str(path), str(tmp_path / "f")], check=True)
    frames = int(pydicom.dcmread(path, stop_before_pixels=True).get("NumberOfFrames") or 1)
    return [np.asarray(Image.open(tmp_path / f"f.{i}.ppm")) for i in range(frames)]


@pytest.mark.parametrize("name", ["examples_ybr_color.dcm", "color3d_jpeg_baseline.dcm", None])
def test_jpeg_ybr_frames_are_dcmtks_rgb(name: str | None, tmp_path: Path) -> None:
    """8-bit JPEG Baseline YBR_FULL_422 (the corpus's cines and a colour phantom cine) decoded by
    libjpeg-turbo to RGB: dcmtk's frames exactly, and pydicom's float conversion of the YCbCr
    frames within one level in a few samples per million (0 on the corpus, 32 of 28.8 M samples
    on 20 phantom frames when measured)."""
    if name is None:
        path = tmp_path / "cine.dcm"
        _jpeg_cine(path, 3)
    else:
        path = CORPUS[name]
    header = frames_module._read_file_header(path)
    assert {p for _, p in frames_module._raw_frames(header, [0], "pillow")} == {"RGB"}
    frames = [frame for frame, _ in iter_frames(path)]
    assert all(f.flags.writeable for f in frames)
    in_memory = [frame for frame, _ in iter_frames(pydicom.dcmread(path))]
    reference = _dcmtk_rgb(path, tmp_path)
    pydicoms = [
        convert_color_space(arr, "YBR_FULL", "RGB")
        for arr, _ in frames_module._raw_frames(header, list(range(len(frames))), "gdcm")
    ]
    off = 0
    for index, (got, memory, want, theirs) in enumerate(
        zip(frames, in_memory, reference, pydicoms, strict=True)
    ):
        assert np.array_equal(got, want), f"frame {index} differs from dcmj2pnm"
        assert np.array_equal(got, memory), f"frame {index}: file and dataset differ"
        diff = np.abs(got.astype(int) - theirs)
        assert diff.max() <= 1, f"frame {index} differs from pydicom's conversion by {diff.max()}"
        off += int(np.count_nonzero(diff))
    assert off <= 1e-5 * sum(f.size for f in frames)


def test_jpeg_frames_decode_into_a_buffer_of_ours_as_pillow_loads_them(tmp_path: Path) -> None:
    """libjpeg-turbo writes into an RGBX array (no ``tobytes`` repacking): the samples Pillow's
    own ``load`` gives, as a new C-contiguous writable RGB array; a stream that ends early still
    fails there (and goes to pydicom's plugins) instead of yielding a half-grey frame."""
    from PIL import Image
    from pydicom.encaps import generate_frames

    ds = _jpeg_cine(tmp_path / "cine.dcm", 2)
    for stream in generate_frames(ds.PixelData, number_of_frames=2):
        got = frames_module._decode_rgb(Image.open(io.BytesIO(stream)), stream)
        want = np.asarray(Image.open(io.BytesIO(stream)))
        assert got.shape == want.shape == (ds.Rows, ds.Columns, 3) and got.dtype == np.uint8
        assert np.array_equal(got, want)
        assert got.flags.c_contiguous and got.flags.writeable and got.flags.owndata
    short = stream[: len(stream) // 2]
    with pytest.raises(ValueError):
        frames_module._decode_rgb(Image.open(io.BytesIO(short)), short)


def test_jpeg_rgb_streams_go_to_pydicom(tmp_path: Path) -> None:
    """A YBR_FULL_422 file whose JPEG streams carry an Adobe marker saying RGB (transform 0) is
    left to pydicom's decoder, which decodes it as it always has."""
    from PIL import Image
    from pydicom.encaps import encapsulate

    path = tmp_path / "cine.dcm"
    ds = _jpeg_cine(path, 2)
    rgb = np.random.default_rng(0).integers(0, 256, (ds.Rows, ds.Columns, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, "JPEG", quality=95, keep_rgb=True)
    assert Image.open(out).info.get("adobe_transform") == 0
    ds.PixelData = encapsulate([out.getvalue()] * 2)
    ds.save_as(path)
    header = frames_module._read_file_header(path)
    raw = list(frames_module._raw_frames(header, [0, 1], "pillow"))
    decoder = get_decoder(JPEGBaseline8Bit)
    expected = list(decoder.iter_array(pydicom.dcmread(path), raw=True, decoding_plugin="pillow"))
    assert [p for _, p in raw] == [str(p["photometric_interpretation"]) for _, p in expected]
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(raw, expected, strict=True))


def test_a_cine_whose_fragments_run_out_fails_on_the_missing_frame(tmp_path: Path) -> None:
    path = tmp_path / "cine.dcm"
    ds = _jpeg_cine(path, 2)
    ds.NumberOfFrames = 3  # the header promises a frame the pixel data lacks
    ds.save_as(path)
    frames = iter_frames(path)
    next(frames), next(frames)
    with pytest.raises(DecodeError, match="frame 2: cannot decode") as info:
        next(frames)
    assert info.value.frame_index == 2
