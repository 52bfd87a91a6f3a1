"""Phantom frames as realistic ultrasound DICOM files (single frame or cine, raw or JPEG).

What makes a US file realistic for our pipeline: RGB pixels with the patient strip burned in
and Burned In Annotation (0028,0301) = YES, a Sequence of Ultrasound Regions (0018,6011)
calibrated in cm (PS3.3 C.8.5.5), Ultrasound Image Storage for one frame and Ultrasound
Multi-frame Image Storage with a Cine module for loops (PS3.3 A.6, A.7), and — as most scanners
send — JPEG Baseline with YBR_FULL_422 (PS3.5 8.2.1).

pydicom 3 has no JPEG Baseline encoder (pylibjpeg decodes only), so frames are encoded by OpenCV's
libjpeg with 4:2:2 chroma subsampling — a JFIF YCbCr bitstream, exactly what YBR_FULL_422 declares —
and encapsulated per PS3.5 A.4. Every file is marked SYNTHETIC and every UID derives from the seed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)

from pipelines.phantom.sample import MANUFACTURER, MODEL, PhantomSample

#: What the phantom's files say about themselves, wherever a viewer shows a description.
SYNTHETIC = "SYNTHETIC PHANTOM"
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, JPEGBaseline8Bit)


def phantom_uid(seed: int, role: str) -> UID:
    """A valid 2.25 UID that depends only on the seed and what it identifies.

    ``generate_uid(prefix=None)`` ignores its entropy sources (it draws a random UUID), so the
    UUID is derived here: SHA-256 of seed and role, stamped as RFC 9562 version 8.
    """
    digest = bytearray(hashlib.sha256(f"usfmd-phantom\x00{seed}\x00{role}".encode()).digest())
    digest[6] = (digest[6] & 0x0F) | 0x80
    digest[8] = (digest[8] & 0x3F) | 0x80
    return UID(f"2.25.{int.from_bytes(digest[:16], 'big')}")


def encode_jpeg_baseline(rgb: np.ndarray, quality: int = 95) -> bytes:
    """One RGB frame as a JPEG Baseline (ISO 10918-1 process 1) YCbCr 4:2:2 bitstream."""
    ok, buffer = cv2.imencode(
        ".jpg",
        np.ascontiguousarray(rgb[..., ::-1]),
        [
            cv2.IMWRITE_JPEG_QUALITY,
            quality,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
            cv2.IMWRITE_JPEG_PROGRESSIVE,
            0,
            cv2.IMWRITE_JPEG_OPTIMIZE,
            0,
        ],
    )
    if not ok:
        raise RuntimeError("OpenCV could not encode the frame as JPEG")
    return bytes(buffer.tobytes())


def phantom_dataset(
    frames: Sequence[PhantomSample],
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    annotated: bool = True,
    jpeg_quality: int = 95,
    frame_time_ms: float = 1000.0 / 30.0,
    series_number: int = 1,
    instance_number: int = 1,
) -> Dataset:
    """A complete US (single frame) or US Multi-frame (cine) instance of the given frames.

    Parameters
    ----------
    frames
        One sample, or the frames of a cine from :func:`pipelines.phantom.make_cine`; identifiers,
        region and spacing come from the first.
    transfer_syntax
        Explicit VR Little Endian (RGB, bit-exact) or JPEG Baseline 8 bit (YBR_FULL_422, lossy).
    annotated
        Store the burned-in frames (default), or the clean ones.
    """
    if not frames:
        raise ValueError("phantom_dataset needs at least one frame")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax {transfer_syntax}: expected one of {TRANSFER_SYNTAXES}")
    first = frames[0]
    pixels = np.stack([f.annotated if annotated else f.clean for f in frames])
    multi = len(frames) > 1
    seed = first.seed
    series_role = f"series-{series_number}-{len(frames)}-{first.labels.kind}"
    sop_class = UltrasoundMultiFrameImageStorage if multi else UltrasoundImageStorage
    sop_uid = phantom_uid(seed, f"{series_role}-{instance_number}-{transfer_syntax}")

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    patient = first.patient
    date, time = patient.study_date, patient.study_time
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = "USFMD-PHANTOM"
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = "F"
    ds.StudyInstanceUID = phantom_uid(seed, "study")
    ds.StudyDate, ds.StudyTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.AccessionNumber = patient.accession
    ds.ReferringPhysicianName = "REFERRER^SYNTHETIC"
    ds.StudyID = "PHANTOM"
    ds.StudyDescription = SYNTHETIC
    ds.Modality = "US"
    ds.SeriesInstanceUID = phantom_uid(seed, series_role)
    ds.SeriesNumber = series_number
    ds.SeriesDescription = SYNTHETIC
    ds.InstanceNumber = instance_number
    ds.ImageComments = f"{SYNTHETIC}: invented patient, not clinical data"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL
    ds.InstitutionName = patient.institution
    ds.SoftwareVersions = MODEL
    ds.PatientOrientation = ""
    ds.BodyPartExamined = "UTERUS"  # obstetric; not a paired structure, so no Laterality (2C)
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.BurnedInAnnotation = "YES"
    ds.SequenceOfUltrasoundRegions = DicomSequence([_region_item(first)])
    ds.SamplesPerPixel = 3
    ds.Rows, ds.Columns = int(pixels.shape[1]), int(pixels.shape[2])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0
    ds.PlanarConfiguration = 0
    if multi:
        ds.NumberOfFrames = len(frames)
        ds.FrameTime = f"{frame_time_ms:.3f}"
        ds.FrameIncrementPointer = 0x00181063  # Frame Time, PS3.3 C.7.6.6 / C.7.6.5
        ds.CineRate = round(1000.0 / frame_time_ms)
        ds.RecommendedDisplayFrameRate = round(1000.0 / frame_time_ms)

    if transfer_syntax == JPEGBaseline8Bit:
        encoded = [encode_jpeg_baseline(frame, jpeg_quality) for frame in pixels]
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ratio = pixels.nbytes / sum(len(e) for e in encoded)
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = f"{ratio:.2f}"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    else:
        ds.PhotometricInterpretation = "RGB"
        ds.PixelData = np.ascontiguousarray(pixels if multi else pixels[0]).tobytes()
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "00"
    return ds


def write_phantom(
    path: str | os.PathLike[str],
    frames: Sequence[PhantomSample],
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    annotated: bool = True,
    jpeg_quality: int = 95,
    frame_time_ms: float = 1000.0 / 30.0,
    series_number: int = 1,
    instance_number: int = 1,
) -> Dataset:
    """Build :func:`phantom_dataset` and write it as a DICOM Part 10 file."""
    ds = phantom_dataset(
        frames,
        transfer_syntax=transfer_syntax,
        annotated=annotated,
        jpeg_quality=jpeg_quality,
        frame_time_ms=frame_time_ms,
        series_number=series_number,
        instance_number=instance_number,
    )
    ds.save_as(path, enforce_file_format=True)
    return ds


def _region_item(sample: PhantomSample) -> Dataset:
    """One Ultrasound Region: the sector, 2-D tissue, deltas in cm (PS3.3 C.8.5.5.1)."""
    r = sample.region
    item = Dataset()
    item.RegionSpatialFormat = 1  # 2D
    item.RegionDataType = 1  # tissue
    item.RegionFlags = 0
    item.RegionLocationMinX0, item.RegionLocationMinY0 = r.x0, r.y0
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = r.x1, r.y1
    item.PhysicalUnitsXDirection = 3  # cm
    item.PhysicalUnitsYDirection = 3
    item.PhysicalDeltaX = sample.mm_per_pixel / 10.0
    item.PhysicalDeltaY = sample.mm_per_pixel / 10.0
    # Reference pixel: the centre of the skin line, relative to the region (C.8.5.5.1.11).
    item.ReferencePixelX0 = (r.x1 - r.x0) // 2
    item.ReferencePixelY0 = 0
    item.ReferencePixelPhysicalValueX = 0.0
    item.ReferencePixelPhysicalValueY = 0.0
    return item
