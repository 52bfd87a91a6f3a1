"""Transfer syntax choice: the requester's order wins among those we accept (PS3.8 §9.3.2.2)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import AE, build_context

from daemon.receive.sop_classes import TRANSFER_SYNTAXES, preferred_syntax
from daemon.service import Daemon

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
PRIVATE_SYNTAX = "1.2.826.0.1.3680043.99.1"


@pytest.mark.parametrize(
    ("proposed", "expected"),
    [
        ([JPEGLosslessSV1, ExplicitVRLittleEndian], JPEGLosslessSV1),
        ([ExplicitVRLittleEndian, JPEGBaseline8Bit], ExplicitVRLittleEndian),
        ([PRIVATE_SYNTAX, RLELossless, ImplicitVRLittleEndian], RLELossless),
        ([PRIVATE_SYNTAX], None),
        # Uncompressed: Explicit VR LE whenever offered (no pixel changes; storescp does too).
        ([ImplicitVRLittleEndian, ExplicitVRLittleEndian], ExplicitVRLittleEndian),
        ([ImplicitVRLittleEndian, JPEGBaseline8Bit], ImplicitVRLittleEndian),
    ],
)
def test_preferred_syntax_follows_the_requester(proposed: list[str], expected: str | None) -> None:
    assert preferred_syntax(proposed, TRANSFER_SYNTAXES) == expected


def test_association_accepts_each_contexts_first_choice(
    start_daemon: Callable[..., Daemon],
) -> None:
    d = start_daemon()
    ae = AE(ae_title="MODALITY")
    ae.requested_contexts = [
        build_context(US_IMAGE, [ExplicitVRLittleEndian, JPEGBaseline8Bit]),
        build_context(US_MULTIFRAME, [JPEGBaseline8Bit, ExplicitVRLittleEndian]),
    ]
    assoc = ae.associate("127.0.0.1", d.server.port, ae_title=d.settings.dicom.ae_title)
    try:
        assert assoc.is_established
        chosen = {cx.abstract_syntax: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
    finally:
        assoc.release()
    assert chosen == {US_IMAGE: ExplicitVRLittleEndian, US_MULTIFRAME: JPEGBaseline8Bit}
