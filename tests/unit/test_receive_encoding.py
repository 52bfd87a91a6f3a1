"""daemon.receive.encoding writes exactly the bytes pydicom/pynetdicom would, or declines."""

from __future__ import annotations

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode

from daemon.receive import encoding
from daemon.receive.sop_classes import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES

UIDS = [
    "1.2.3.4",  # even length
    "1.2.3.45",  # odd length: padded
    "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678",  # 64 characters
]


def _pynetdicom_meta(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    meta = create_file_meta(
        sop_class_uid=UID(sop_class),
        sop_instance_uid=UID(sop_instance),
        transfer_syntax=UID(syntax),
    )
    write_file_meta_info(out, meta)
    return out.getvalue()


@pytest.mark.parametrize("sop_instance", UIDS)
def test_file_meta_is_byte_exact_for_every_accepted_class_and_syntax(sop_instance: str) -> None:
    assert len(UIDS[-1]) == 64
    for sop_class in STORAGE_SOP_CLASSES:
        for syntax in TRANSFER_SYNTAXES:
            expected = _pynetdicom_meta(sop_class, sop_instance, syntax)
            assert encoding.file_meta(UID(sop_class), UID(sop_instance), UID(syntax)) == expected


def test_file_meta_reads_back() -> None:
    raw = encoding.file_meta("1.2.840.10008.5.1.4.1.1.6.1", "1.2.3.45", "1.2.840.10008.1.2.1")
    assert raw is not None
    meta = dcmread(DicomBytesIO(raw), force=True).file_meta
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.45"
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert meta.FileMetaInformationGroupLength == len(raw) - 132 - 12


@pytest.mark.parametrize(
    "bad", ["", "1.2.3.x", "1.2.3 ", "1." + "2" * 63, "١.٢", None, 12345, b"1.2.3"]
)
def test_values_that_are_not_plain_uids_are_left_to_pydicom(bad: object) -> None:
    assert encoding.file_meta(bad, "1.2.3", "1.2.840.10008.1.2") is None
    assert encoding.file_meta("1.2.3", bad, "1.2.840.10008.1.2") is None
    assert encoding.file_meta("1.2.3", "1.2.3", bad) is None
    assert encoding.c_store_success(1, bad, "1.2.3") is None
    assert encoding.c_store_success(1, "1.2.3", bad) is None


def _pynetdicom_rsp(message_id: int, sop_class: str, sop_instance: str) -> bytes:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = 0x0000
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    return bytes(encode(message.command_set, True, True))


@pytest.mark.parametrize("message_id", [0, 1, 255, 256, 65535])
@pytest.mark.parametrize("sop_instance", UIDS)
def test_c_store_success_is_byte_exact(message_id: int, sop_instance: str) -> None:
    for sop_class in ("1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.7"):
        expected = _pynetdicom_rsp(message_id, sop_class, sop_instance)
        assert encoding.c_store_success(message_id, sop_class, sop_instance) == expected


@pytest.mark.parametrize("message_id", [-1, 65536, None, "1", 1.0])
def test_c_store_success_declines_message_ids_out_of_range(message_id: object) -> None:
    assert encoding.c_store_success(message_id, "1.2.3", "1.2.3") is None
