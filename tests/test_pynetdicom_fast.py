"""dicomnode._pynetdicom_fast: the hand-encoded C-STORE response is what pynetdicom would send,
and associations on the faster paths still talk DICOM correctly to pynetdicom and DCMTK."""

from __future__ import annotations

import socket
import struct
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, Verification

from dicomnode._pynetdicom_fast import c_echo_rsp_pdu, c_store_rsp_pdu
from tests.conftest import storescu, wait_for
from tests.dicomgen import encoded, make_series, write_series


def _pynetdicom_rsp_pdu(
    context_id: int,
    message_id: int,
    sop_class: str,
    sop_instance: str,
    status: int,
    comment: str | None = None,
) -> bytes:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    if comment is not None:
        rsp.ErrorComment = comment
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


@pytest.mark.parametrize(
    "comment", ["odd length", "even length!", "x" * 64, "study 1.2.3 belongs to another patient"]
)
def test_c_store_rsp_with_error_comment_matches_pynetdicom(comment: str) -> None:
    ours = c_store_rsp_pdu(1, 7, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 0xC230, comment)
    theirs = _pynetdicom_rsp_pdu(1, 7, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 0xC230, comment)
    assert ours == theirs


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
        refused = assoc.send_c_store(bad)
        assert refused.Status == 0xC210
        assert refused.ErrorComment == "missing StudyInstanceUID"
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


def test_c_echo_rsp_bytes_match_pynetdicom() -> None:
    for context_id, message_id in [(1, 1), (7, 40000)]:
        rsp = C_ECHO()
        rsp.MessageIDBeingRespondedTo = message_id
        rsp.AffectedSOPClassUID = Verification
        rsp.Status = 0x0000
        msg = C_ECHO_RSP()
        msg.primitive_to_message(rsp)
        (pdata,) = list(msg.encode_msg(context_id, 16384))
        pdu = P_DATA_TF()
        pdu.from_primitive(pdata)
        assert c_echo_rsp_pdu(context_id, message_id, Verification, 0x0000) == bytes(pdu.encode())


# --- the connection thread serving requests itself, fed PDUs by hand ------------------------


class RawAssociation:
    """An association negotiated by pynetdicom whose socket the test then drives by hand:
    pynetdicom's own threads on this side are stopped once the association is established."""

    def __init__(self, port: int, contexts: list[str]) -> None:
        ae = AE(ae_title="RAWSCU")
        for uid in contexts:
            ae.add_requested_context(uid, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        assert assoc.is_established
        self.context_ids = {
            str(cx.abstract_syntax): cx.context_id for cx in assoc.accepted_contexts
        }
        assoc._kill = True
        assoc.dul._kill_thread = True
        assoc.dul.join(5)
        assoc.join(5)
        sock = assoc.dul.socket.socket
        assert sock is not None
        sock.settimeout(30)
        self.sock: socket.socket = sock

    def send_pdvs(self, *pdvs: tuple[int, int, bytes]) -> None:
        """One P-DATA-TF PDU of (context ID, message control header, data) PDVs."""
        items = b"".join(
            struct.pack(">IBB", len(data) + 2, cid, control) + data for cid, control, data in pdvs
        )
        self.sock.sendall(struct.pack(">BBI", 0x04, 0, len(items)) + items)

    def read_pdu(self) -> tuple[int, bytes]:
        header = self._read(6)
        pdu_type, _, length = struct.unpack(">BBI", header)
        return pdu_type, self._read(length)

    def read_response(self) -> Dataset:
        """The command set of the next response (a P-DATA-TF with one whole command PDV)."""
        pdu_type, body = self.read_pdu()
        assert pdu_type == 0x04, f"expected P-DATA-TF, got PDU type 0x{pdu_type:02X}"
        length, _cid, control = struct.unpack(">IBB", body[:6])
        assert control == 0x03 and len(body) == 4 + length
        return read_dataset(BytesIO(body[6:]), is_implicit_VR=True, is_little_endian=True)

    def release(self) -> None:
        self.sock.sendall(bytes.fromhex("05000000000400000000"))
        assert self.read_pdu()[0] == 0x06  # A-RELEASE-RP
        self.sock.close()

    def __enter__(self) -> RawAssociation:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.sock.close()

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"connection closed after {len(data)} of {n} bytes")
            data += chunk
        return data


def _command_set(**elements: Any) -> bytes:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.CommandGroupLength = 0
    body = encoded(ds, ImplicitVRLittleEndian)[12:]  # without the group length written above
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def _c_store_rq(message_id: int, ds: Dataset) -> bytes:
    return _command_set(
        AffectedSOPClassUID=ds.SOPClassUID,
        CommandField=0x0001,
        MessageID=message_id,
        Priority=0,
        CommandDataSetType=0x0000,
        AffectedSOPInstanceUID=ds.SOPInstanceUID,
    )


def test_c_store_with_the_data_set_in_many_pdus_and_pdvs(make_node, ct_files: list[Path]) -> None:
    node = make_node()
    raw = RawAssociation(node.port, [CTImageStorage])
    cid = raw.context_ids[CTImageStorage]
    sent = {}
    for message_id, path in enumerate(ct_files[:3], start=1):
        ds = pydicom.dcmread(path)
        data = encoded(ds)
        a, b = len(data) // 3, 2 * len(data) // 3
        raw.send_pdvs((cid, 0x03, _c_store_rq(message_id, ds)))
        raw.send_pdvs((cid, 0x00, data[:100]), (cid, 0x00, data[100:a]))  # two PDVs, one PDU
        raw.send_pdvs((cid, 0x00, data[a:b]))
        raw.send_pdvs((cid, 0x02, data[b:]))
        rsp = raw.read_response()
        assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (
            0x8001,
            message_id,
            0x0000,
        )
        assert rsp.AffectedSOPInstanceUID == ds.SOPInstanceUID
        sent[ds.SOPInstanceUID] = data
    # The command and the whole data set of the last message in one PDU.
    ds = pydicom.dcmread(ct_files[3])
    data = encoded(ds)
    raw.send_pdvs((cid, 0x03, _c_store_rq(4, ds)), (cid, 0x02, data))
    assert raw.read_response().Status == 0x0000
    sent[ds.SOPInstanceUID] = data
    raw.release()
    stored = {}
    for path in node.storage_files():
        f = pydicom.dcmread(path)
        stored[f.SOPInstanceUID] = path.read_bytes()
    assert stored.keys() == sent.keys()
    for uid, data in sent.items():
        assert stored[uid].endswith(data)  # the data set byte for byte after the file meta
    wait_for(lambda: "RAWSCU from" in node.log(), what="the association's log line")
    assert "4 stored, 0 duplicate, 0 conflicting, 0 failed" in node.log()
    assert "pynetdicom serves it" not in node.log()


def test_c_echo_served_and_association_released(make_node) -> None:
    node = make_node()
    raw = RawAssociation(node.port, [Verification])
    cid = raw.context_ids[Verification]
    echo = _command_set(
        AffectedSOPClassUID=Verification,
        CommandField=0x0030,
        MessageID=9,
        CommandDataSetType=0x0101,
    )
    raw.send_pdvs((cid, 0x03, echo))
    rsp = raw.read_response()
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8030, 9, 0)
    raw.release()


def test_broken_message_sequences_abort_the_association(make_node, ct_files: list[Path]) -> None:
    node = make_node()
    ds = pydicom.dcmread(ct_files[0])
    data = encoded(ds)
    # A data set fragment with no command before it (left to pynetdicom, which aborts).
    with RawAssociation(node.port, [CTImageStorage]) as raw:
        cid = raw.context_ids[CTImageStorage]
        raw.send_pdvs((cid, 0x02, data))
        assert raw.read_pdu()[0] == 0x07  # A-ABORT
    # A new command while the data set of the last one is still arriving (served here).
    with RawAssociation(node.port, [CTImageStorage]) as raw:
        cid = raw.context_ids[CTImageStorage]
        raw.send_pdvs((cid, 0x03, _c_store_rq(1, ds)), (cid, 0x00, data[:1000]))
        raw.send_pdvs((cid, 0x03, _c_store_rq(2, ds)))
        assert raw.read_pdu()[0] == 0x07
    # A data set fragment on another presentation context than its command's.
    with RawAssociation(node.port, [CTImageStorage, Verification]) as raw:
        cid = raw.context_ids[CTImageStorage]
        other = raw.context_ids[Verification]
        raw.send_pdvs((cid, 0x03, _c_store_rq(1, ds)), (cid, 0x00, data[:1000]))
        raw.send_pdvs((other, 0x02, data[1000:]))
        assert raw.read_pdu()[0] == 0x07
    wait_for(lambda: node.log().count("RAWSCU from") == 3, what="three association log lines")
    assert node.log().count("0 stored, 0 duplicate, 0 conflicting, 0 failed, 0 bytes") == 3
    assert "aborted: a command arrived before the data set of the last one ended" in node.log()
    assert "aborted: a data set fragment on another presentation context" in node.log()
    assert node.storage_files() == []
    # The node goes on serving other associations.
    assert storescu(node.port, ct_files[:2]).returncode == 0
    assert node.studies()[0]["instances"] == 2


def test_messages_it_does_not_serve_go_to_pynetdicom(make_node, ct_files: list[Path]) -> None:
    """A command set split over two PDUs is left to pynetdicom, which serves the rest of the
    association as before."""
    node = make_node()
    raw = RawAssociation(node.port, [CTImageStorage])
    cid = raw.context_ids[CTImageStorage]
    for message_id, path in enumerate(ct_files[:3], start=1):
        ds = pydicom.dcmread(path)
        command = _c_store_rq(message_id, ds)
        if message_id == 1:
            raw.send_pdvs((cid, 0x01, command[:20]))
            raw.send_pdvs((cid, 0x03, command[20:]))
        else:
            raw.send_pdvs((cid, 0x03, command))
        raw.send_pdvs((cid, 0x02, encoded(ds)))
        rsp = raw.read_response()
        assert (rsp.MessageIDBeingRespondedTo, rsp.Status) == (message_id, 0x0000)
    raw.release()
    assert node.studies()[0]["instances"] == 3
    assert "pynetdicom serves it from here (message does not start with a whole command set)" in (
        node.log()
    )


def test_unaccepted_presentation_context_aborts(make_node, ct_files: list[Path]) -> None:
    node = make_node()
    ds = pydicom.dcmread(ct_files[0])
    with RawAssociation(node.port, [CTImageStorage]) as raw:
        raw.send_pdvs((99, 0x03, _c_store_rq(1, ds)), (99, 0x02, encoded(ds)))
        assert raw.read_pdu()[0] == 0x07  # A-ABORT, as pynetdicom answers it
    assert node.storage_files() == []
    assert "presentation context 99 was not accepted" in node.log()


def test_dcmtk_storescu_with_small_pdus(make_node, tmp_path: Path) -> None:
    files = write_series(tmp_path / "big", make_series(6, rows=256, columns=256, modality="CT"))
    node = make_node()
    storescu(node.port, files, extra=["--max-send-pdu", "4096"])
    assert "pynetdicom serves it" not in node.log()
    stored = {pydicom.dcmread(p).SOPInstanceUID: p for p in node.storage_files()}
    for path in files:
        original = pydicom.dcmread(path)
        assert pydicom.dcmread(stored[original.SOPInstanceUID]).PixelData == original.PixelData


def test_peer_gone_before_the_response(make_node, ct_files: list[Path]) -> None:
    """A sender that closes the connection right after its data set: the node notices, logs
    the association and goes on serving; the data set it received whole is kept (a resend
    counts as a duplicate). One that leaves inside a fragment leaves nothing behind."""
    node = make_node()
    ds = pydicom.dcmread(ct_files[0])
    with RawAssociation(node.port, [CTImageStorage]) as raw:
        cid = raw.context_ids[CTImageStorage]
        raw.send_pdvs((cid, 0x03, _c_store_rq(1, ds)), (cid, 0x02, encoded(ds)))
    # And one that leaves in the middle of a data set fragment: nothing of it is kept.
    cut = pydicom.dcmread(ct_files[1])
    data = encoded(cut)
    with RawAssociation(node.port, [CTImageStorage]) as raw:
        cid = raw.context_ids[CTImageStorage]
        raw.send_pdvs((cid, 0x03, _c_store_rq(1, cut)))
        pdv = struct.pack(">IBB", len(data) + 2, cid, 0x02) + data
        raw.sock.sendall(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv[: len(pdv) // 2])
    wait_for(lambda: node.log().count("RAWSCU from") == 2, what="two association log lines")
    assert node.log().count("0 stored, 0 duplicate, 0 conflicting, 0 failed, 0 bytes") == 1
    assert storescu(node.port, ct_files).returncode == 0
    study = node.studies()[0]
    assert study["instances"] == len(ct_files)
    assert study["duplicates"] == 1  # the one it had already kept
