"""Faster paths through pynetdicom 3.0 for the storage SCP, kept in this one module.

Measured on a 0.53 MB C-STORE over loopback, pynetdicom spends more time waiting and copying
than working: its reactors poll with blind 1 ms sleeps (the association thread before every
check for a new message, the connection thread whenever nothing happened), so each instance
waits about 1.5 ms for threads to notice each other; it reads the socket 4 KB at a time; and it
builds the ~150-byte C-STORE response through a pydicom Dataset, encoding it twice.

:func:`install` changes one newly created acceptor association, nothing global:

- its socket (``_Socket``) reads a PDU with a few ``recv_into`` calls, and its ``ready`` check
  waits on the socket for up to ``WAIT`` seconds instead of returning at once, so the
  connection thread wakes as soon as data arrives rather than after its next sleep;
- its DIMSE provider (``_DIMSE``) waits on its message queue for up to ``WAIT`` seconds when
  the association reactor polls it, so a complete request is served as soon as it is decoded;
  and it encodes a C-STORE response by hand (:func:`c_store_rsp_pdu`, byte for byte what
  pynetdicom would send, proved by tests/test_pynetdicom_fast.py) and writes it to the socket
  from the association thread instead of queueing it for the connection thread.

Everything else (other messages, responses with an error comment or offending element, bound
DIMSE/PDU/data-sent event handlers, a state other than "association established", TLS
sockets) goes through pynetdicom unchanged. The classes are swapped on the instances pynetdicom
created (``__class__``), as the subclasses add no state. pynetdicom is pinned to 3.0.x in
pyproject.toml; a new minor version must be checked against this module.
"""

from __future__ import annotations

import queue
import select
import ssl
import struct
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import AssociationSocket

__all__ = ["WAIT", "c_store_rsp_pdu", "install"]

WAIT = 0.005  # seconds a reactor thread waits for its event instead of sleeping blind
_SENT_EVENTS = (evt.EVT_DIMSE_SENT, evt.EVT_PDU_SENT, evt.EVT_DATA_SENT)
_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<HHIH")


def _ui(element: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\x00"
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def c_store_rsp_pdu(
    context_id: int, message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int
) -> bytes:
    """A P-DATA-TF PDU carrying a C-STORE-RSP command set (implicit VR little endian, no
    data set) in one PDV, as pynetdicom encodes it."""
    elements = b"".join(
        (
            _ui(0x0002, sop_class_uid),
            _US.pack(0x0000, 0x0100, 2, 0x8001),  # CommandField: C-STORE-RSP
            _US.pack(0x0000, 0x0120, 2, message_id),
            _US.pack(0x0000, 0x0800, 2, 0x0101),  # CommandDataSetType: no data set
            _US.pack(0x0000, 0x0900, 2, status),
            _ui(0x1000, sop_instance_uid),
        )
    )
    command = _ELEMENT.pack(0x0000, 0x0000, 4) + struct.pack("<I", len(elements)) + elements
    # PDV: item length, presentation context ID, message control header (command, last).
    pdv = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBI", 0x04, 0x00, len(pdv)) + pdv


class _DIMSE(DIMSEServiceProvider):
    def get_msg(self, block: bool = False) -> Any:
        if block:
            return super().get_msg(block)
        # The association reactor polls without blocking after a 1 ms sleep; waiting here
        # instead serves a request as soon as it is complete. Release and abort are still
        # noticed within WAIT seconds.
        try:
            return self.msg_queue.get(block=True, timeout=WAIT)
        except queue.Empty:
            return None, None

    def send_msg(self, primitive: Any, context_id: int) -> None:
        pdu = self._fast_c_store_rsp(primitive, context_id)
        if pdu is None:
            super().send_msg(primitive, context_id)
            return
        self.dul.socket.send(pdu)  # type: ignore[union-attr]

    def _fast_c_store_rsp(self, primitive: Any, context_id: int) -> bytes | None:
        """The encoded response when it can take the short path, else None."""
        if (
            type(primitive) is not C_STORE
            or primitive.MessageIDBeingRespondedTo is None
            or primitive.AffectedSOPClassUID is None
            or primitive.AffectedSOPInstanceUID is None
            or not isinstance(primitive.Status, int)
            or primitive.ErrorComment is not None
            or primitive.OffendingElement is not None
        ):
            return None
        assoc = self.assoc
        if any(assoc.get_handlers(event) for event in _SENT_EVENTS):
            return None
        dul = self.dul
        if dul.state_machine.current_state != "Sta6" or not isinstance(dul.socket, _Socket):
            return None
        pdu = c_store_rsp_pdu(
            context_id,
            primitive.MessageIDBeingRespondedTo,
            str(primitive.AffectedSOPClassUID),
            str(primitive.AffectedSOPInstanceUID),
            primitive.Status,
        )
        limit = self.maximum_pdu_size
        if limit and len(pdu) - 6 > limit:
            return None
        return pdu


class _Socket(AssociationSocket):
    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or self._is_connected is False or isinstance(sock, ssl.SSLSocket):
            return bool(super().ready)
        try:
            readable, _, _ = select.select([sock], [], [], WAIT)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        return bool(readable)

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        if sock is None or isinstance(sock, ssl.SSLSocket):
            return super().recv(nr_bytes)
        data = bytearray(nr_bytes)
        view = memoryview(data)
        received = 0
        while received < nr_bytes:
            n = sock.recv_into(view[received:], nr_bytes - received)
            if not n:  # connection closed: what arrived so far, as pynetdicom does
                del view
                return data[:received]
            received += n
        return data


def install(assoc: Any) -> None:
    """Switch a newly created acceptor association to the faster paths (see module doc)."""
    if type(assoc.dimse) is DIMSEServiceProvider:
        assoc.dimse.__class__ = _DIMSE
    sock = assoc.dul.socket
    if type(sock) is AssociationSocket:
        sock.__class__ = _Socket
