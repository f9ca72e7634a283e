"""dicomnode._pynetdicom_fast: the hand-encoded C-STORE response is what pynetdicom would send,
and associations on the faster paths still talk DICOM correctly to pynetdicom and DCMTK."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, Verification

from dicomnode._pynetdicom_fast import c_store_rsp_pdu
from tests.conftest import storescu


def _pynetdicom_rsp_pdu(
    context_id: int, message_id: int, sop_class: str, sop_instance: str, status: int
) -> bytes:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    (pdata,) = list(msg.encode_msg(context_id, 16384))
    pdu = P_DATA_TF()
    pdu.from_primitive(pdata)
    return bytes(pdu.encode())


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC210, 0x0110, 0xB000])
@pytest.mark.parametrize(
    ("sop_class", "sop_instance"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"),  # odd / even lengths
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.1234567890123456789012345678"),
        ("1.2", "1.2.3"),
    ],
)
@pytest.mark.parametrize(("context_id", "message_id"), [(1, 1), (3, 513), (255, 65535)])
def test_c_store_rsp_bytes_match_pynetdicom(
    status: int, sop_class: str, sop_instance: str, context_id: int, message_id: int
) -> None:
    ours = c_store_rsp_pdu(context_id, message_id, sop_class, sop_instance, status)
    assert ours == _pynetdicom_rsp_pdu(context_id, message_id, sop_class, sop_instance, status)


def test_pynetdicom_scu_reads_the_fast_responses(make_node, ct_files: list[Path]) -> None:
    node = make_node()
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        for path in ct_files[:4]:
            ds = pydicom.dcmread(path)
            status = assoc.send_c_store(ds)
            assert status.Status == 0x0000
        # A failure status goes through the same encoder.
        bad = pydicom.dcmread(ct_files[4])
        del bad.StudyInstanceUID
        assert assoc.send_c_store(bad).Status == 0xC210
        # The same instance again: success, counted as a duplicate.
        assert assoc.send_c_store(pydicom.dcmread(ct_files[0])).Status == 0x0000
    finally:
        assoc.release()
    assert not assoc.is_established
    study = node.studies()[0]
    assert study["instances"] == 4
    assert study["duplicates"] == 1


def test_dcmtk_storescu_reads_the_fast_responses(make_node, ct_files: list[Path]) -> None:
    node = make_node()
    result = storescu(node.port, ct_files)
    assert result.stdout.count("Received Store Response (Success)") + result.stderr.count(
        "Received Store Response (Success)"
    ) == len(ct_files)
    assert node.studies()[0]["instances"] == len(ct_files)
