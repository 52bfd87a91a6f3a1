"""daemon.receive.header decodes the index's fields exactly as pydicom does, or declines."""

from __future__ import annotations

import functools
import glob
import io
import os
import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from daemon.db.index import InstanceHeader
from daemon.errors import ConformanceError
from daemon.receive.handlers import _at_pixel_data
from daemon.receive.header import HEAD_BYTES, read_header_fields

from helpers import _data_dirs, ultrasound_files


def _pydicom(raw: bytes, syntax: str) -> tuple[object, int]:
    """The header (or the error) and Pixel Data offset through pydicom, as the handler does."""
    fp = io.BytesIO(raw)
    ds = read_partial(fp, stop_when=_at_pixel_data)
    try:
        return InstanceHeader.from_dataset(ds, syntax), fp.tell()
    except (ConformanceError, ValueError, TypeError, KeyError) as exc:
        return (type(exc), str(exc)), fp.tell()


def _plain(raw: bytes, syntax: str) -> tuple[object, int] | None:
    plain = read_header_fields(raw[:HEAD_BYTES], syntax)
    if plain is None:
        return None
    fields, offset = plain
    try:
        return InstanceHeader.from_dataset(fields, syntax), offset
    except (ConformanceError, ValueError, TypeError, KeyError) as exc:
        return (type(exc), str(exc)), offset


@functools.cache
def _corpus() -> tuple[tuple[str, bytes, str], ...]:
    """(name, bytes, transfer syntax) of every local pydicom/pydicom-data file with a preamble."""
    found = []
    for directory in _data_dirs():
        for name in sorted(glob.glob(os.path.join(directory, "**", "*"), recursive=True)):
            if not os.path.isfile(name) or os.path.getsize(name) < 132:
                continue
            raw = Path(name).read_bytes()
            if raw[128:132] != b"DICM":
                continue
            try:
                syntax = str(
                    dcmread(io.BytesIO(raw), stop_before_pixels=True).file_meta.TransferSyntaxUID
                )
            except (InvalidDicomError, AttributeError, ValueError, KeyError, TypeError, EOFError):
                continue
            found.append((name, raw, syntax))
    return tuple(found)


def test_every_test_file_decodes_as_with_pydicom_or_is_declined() -> None:
    taken = 0
    for name, raw, syntax in _corpus():
        try:
            expected = _pydicom(raw, syntax)
        except Exception:  # noqa: BLE001 - pydicom refuses it: the handler quarantines it
            expected = None
        plain = _plain(raw, syntax)
        if plain is None:
            continue
        taken += 1
        assert plain == expected, name
    assert taken >= 100, f"only {taken} of {len(_corpus())} files took the plain path"
    print(f"{taken} of {len(_corpus())} files took the plain path")


def test_ultrasound_files_in_explicit_little_endian_take_the_plain_path() -> None:
    explicit = 0
    for path in ultrasound_files():
        raw = path.read_bytes()
        ds = dcmread(path, stop_before_pixels=True)
        syntax = str(ds.file_meta.TransferSyntaxUID)
        if syntax != ExplicitVRLittleEndian or "ContributingEquipmentSequence" in ds:
            continue
        if "SpecificCharacterSet" in ds or "=" in str(ds.get("PatientName", "")):
            continue
        explicit += 1
        assert _plain(raw, syntax) == _pydicom(raw, syntax), path.name
    assert explicit >= 5


def _file(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _us(**extra: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.1"
    ds.PatientID = "P1 "
    ds.PatientName = "Doe^Jane"
    ds.Modality = "US"
    ds.SeriesNumber = "  7"
    ds.InstanceNumber = None
    ds.NumberOfFrames = "1"
    ds.Rows, ds.Columns = 4, 2
    ds.PhotometricInterpretation = "RGB"
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 3, 8, 8, 7
    ds.PixelRepresentation = 0
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.PixelData = b"\x00" * 24
    return ds


def test_sequences_of_undefined_length_are_skipped() -> None:
    region = Dataset()
    region.RegionSpatialFormat = 1
    inner = Dataset()
    inner.CodeValue = "X"
    region.PixelComponentPhysicalUnits = 3
    region.RegionDataType = 1
    region.SourceImageSequence = Sequence([inner])
    ds = _us(SequenceOfUltrasoundRegions=Sequence([region, Dataset()]))
    ds["SequenceOfUltrasoundRegions"].is_undefined_length = True
    raw = _file(ds)
    plain = _plain(raw, ExplicitVRLittleEndian)
    assert plain is not None and plain == _pydicom(raw, ExplicitVRLittleEndian)
    header = plain[0]
    assert isinstance(header, InstanceHeader)
    assert header.series_number == 7 and header.instance_number is None
    assert header.patient_id == "P1" and header.rows == 4 and header.columns == 2


@pytest.mark.parametrize(
    "extra",
    [
        {"PatientName": "Yamada^Tarou=山田^太郎"},  # component groups
        {"SpecificCharacterSet": "ISO 2022 IR 87"},  # code extensions
        {"SeriesNumber": "1.0"},  # pydicom's IS reading, not ours
        {"Modality": "US\\OT"},  # several values
        {"Manufacturer": "Müller"},  # not ASCII
        {"ContributingEquipmentSequence": Sequence([Dataset()])},  # the loop guard's sequence
    ],
)
def test_values_outside_the_plain_case_are_left_to_pydicom(extra: dict[str, object]) -> None:
    raw = _file(_us(**extra))
    assert read_header_fields(raw, ExplicitVRLittleEndian) is None


def test_other_encodings_truncation_and_long_headers_are_left_to_pydicom() -> None:
    raw = _file(_us())
    assert read_header_fields(raw, "1.2.840.10008.1.2") is None  # Implicit VR Little Endian
    assert read_header_fields(raw, "1.2.840.10008.1.2.1.99") is None  # Deflated
    assert read_header_fields(raw[:-40], ExplicitVRLittleEndian) is None  # no Pixel Data
    assert read_header_fields(raw[:100], ExplicitVRLittleEndian) is None
    long = _file(_us(ImageComments="x" * HEAD_BYTES))
    assert read_header_fields(long[:HEAD_BYTES], ExplicitVRLittleEndian) is None
    assert read_header_fields(raw, JPEGBaseline8Bit) is not None  # same data set encoding


def test_a_broken_element_length_is_left_to_pydicom() -> None:
    raw = bytearray(_file(_us()))
    at = raw.index(b"\x08\x00\x16\x00UI")  # SOP Class UID, the first element after the meta
    struct.pack_into("<H", raw, at + 6, 0xFFF0)  # now runs past the end of the file
    assert read_header_fields(bytes(raw), ExplicitVRLittleEndian) is None
