"""Faster paths through pynetdicom 3.0 for the storage SCP, kept in this one module.

Measured on a 0.53 MB C-STORE over loopback, pynetdicom spends more time waiting, copying and
decoding than working: its reactors poll with blind 1 ms sleeps, it reads the socket 4 KB at a
time, every P-DATA PDU becomes a primitive that passes through the state machine, every command
set is decoded into a pydicom Dataset, the request is handed from the connection thread to the
association thread through a queue, and the ~150-byte response is built through a Dataset and
encoded twice. With four associations in one process that is eight threads taking turns on one
interpreter lock for each instance.

:func:`install` changes one newly created acceptor association, nothing global:

- its connection (``_DUL``) serves C-STORE and C-ECHO requests itself once the association is
  established: the connection thread reads each P-DATA-TF PDU, takes the command set apart by
  hand (a handful of group 0000 elements in implicit VR little endian), reads the data set
  fragments into one buffer (straight from the socket when a fragment is alone in its PDU,
  as DCMTK and pynetdicom send them; sized by the previous data set), calls the store
  callback given to :func:`install` and writes the response
  (:func:`c_store_rsp_pdu`, byte for byte what pynetdicom would send, proved by
  tests/test_pynetdicom_fast.py). The association thread only waits for release or abort.
  Any other PDU (release, abort, a malformed one) and any message it does not serve (another
  command, a command set split over several PDUs, an unknown presentation context) goes to
  pynetdicom unchanged, which then serves the rest of that association as it always does;
- its socket (``_Socket``) reads a PDU with a few ``recv_into`` calls, and its ``ready`` check
  waits on the socket for up to ``WAIT`` seconds instead of returning at once, so the
  connection thread wakes as soon as data arrives rather than after its next sleep (but not
  while an answer of the association thread, A-ASSOCIATE-AC or A-RELEASE-RP, is due);
- its DIMSE provider (``_DIMSE``), for associations pynetdicom serves, waits on its message
  queue for up to ``WAIT`` seconds when the association reactor polls it, and writes a plain
  C-STORE response from the association thread instead of queueing it.

The fast paths stand aside when handlers are bound to the PDU, DIMSE or data events they would
skip. The classes are swapped on the instances pynetdicom created (``__class__``). pynetdicom is
pinned to 3.0.x in pyproject.toml; a new minor version must be checked against this module.
"""

from __future__ import annotations

import logging
import mmap
import queue
import select
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

from storage.filestore import ALIGNMENT, FileImage, aligned

__all__ = [
    "WAIT",
    "PrefixCallback",
    "StoreCallback",
    "c_echo_rsp_pdu",
    "c_store_rsp_pdu",
    "install",
]

logger = logging.getLogger(__name__)

WAIT = 0.005  # seconds a reactor thread waits for its event instead of sleeping blind
IDLE_WAIT = 0.1  # seconds the association thread waits while the connection thread serves
# Upper layer states in which the connection thread waits for the peer, not for this node:
# awaiting the A-ASSOCIATE-RQ, data transfer, awaiting the connection close.
_PEER_STATES = frozenset(("Sta2", "Sta6", "Sta13"))
_SENT_EVENTS = (evt.EVT_DIMSE_SENT, evt.EVT_PDU_SENT, evt.EVT_DATA_SENT)
# Events whose handlers would miss what the connection thread serves itself (the store
# callback stands for the EVT_C_STORE handler).
_RECV_EVENTS = (evt.EVT_PDU_RECV, evt.EVT_DATA_RECV, evt.EVT_DIMSE_RECV, *_SENT_EVENTS)
_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<HHIH")
_PDU_HEADER = struct.Struct(">BBI")
_PDV_HEADER = struct.Struct(">IBB")
_U16 = struct.Struct("<H")
_C_STORE_RQ = 0x0001
_C_ECHO_RQ = 0x0030
_NO_DATA_SET = 0x0101
_HANDLER_FAILED = 0xC211  # pynetdicom's status for an exception in the C-STORE handler

StoreCallback = Callable[
    [Any, str, str, str, bytes | memoryview, FileImage | None], "int | tuple[int, str]"
]
"""``store(assoc, transfer_syntax, sop_class_uid, sop_instance_uid, dataset, image) ->
status``, or ``(status, error comment)`` to tell the sender why an instance was refused;
``image`` is the file to store (prefix and data set) in one aligned buffer, when served here."""
PrefixCallback = Callable[[Any, str, str, str], bytes]
"""``prefix(assoc, transfer_syntax, sop_class_uid, sop_instance_uid) -> bytes`` to place in
front of the data set in the receive buffer (the stored file's preamble and file meta)."""


def _ui(element: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\x00"
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def _lo(element: int, text: str) -> bytes:
    value = text.encode("ascii", "replace")[:64]
    if len(value) % 2:
        value += b" "
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def c_store_rsp_pdu(
    context_id: int,
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    status: int,
    error_comment: str | None = None,
) -> bytes:
    """A P-DATA-TF PDU carrying a C-STORE-RSP command set (implicit VR little endian, no
    data set) in one PDV, as pynetdicom encodes it; ``error_comment`` (Error Comment, up to
    64 characters of ASCII) for a failure."""
    return _rsp_pdu(
        context_id, 0x8001, message_id, sop_class_uid, sop_instance_uid, status, error_comment
    )


def c_echo_rsp_pdu(context_id: int, message_id: int, sop_class_uid: str, status: int) -> bytes:
    """A P-DATA-TF PDU carrying a C-ECHO-RSP command set, as pynetdicom encodes it."""
    return _rsp_pdu(context_id, 0x8030, message_id, sop_class_uid, None, status)


def _rsp_pdu(
    context_id: int,
    command_field: int,
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str | None,
    status: int,
    error_comment: str | None = None,
) -> bytes:
    elements = b"".join(
        (
            _ui(0x0002, sop_class_uid),
            _US.pack(0x0000, 0x0100, 2, command_field),
            _US.pack(0x0000, 0x0120, 2, message_id),
            _US.pack(0x0000, 0x0800, 2, _NO_DATA_SET),  # CommandDataSetType
            _US.pack(0x0000, 0x0900, 2, status),
            _lo(0x0902, error_comment) if error_comment else b"",
            _ui(0x1000, sop_instance_uid) if sop_instance_uid is not None else b"",
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
        # noticed within WAIT seconds. While the connection thread serves the requests
        # itself, this thread has only release and abort to notice, and _WakingQueue wakes
        # it for those: it waits longer.
        dul = self.dul
        timeout = IDLE_WAIT if isinstance(dul, _DUL) and dul.serves_here else WAIT
        try:
            return self.msg_queue.get(block=True, timeout=timeout)
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


class _WakingQueue(queue.Queue[Any]):
    """The connection's queue of primitives for the association thread (release, abort); a
    put also wakes that thread from its wait on the DIMSE message queue."""

    wakes: queue.Queue[Any] | None = None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        if self.wakes is not None:
            self.wakes.put((None, None))


class _Socket(AssociationSocket):
    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or self._is_connected is False or isinstance(sock, ssl.SSLSocket):
            return bool(super().ready)
        # Wait for the peer only in states where nothing else can come: when the association
        # thread is to answer (accept, release), its answer is queued for this thread, which
        # must not sit in select meanwhile.
        state = self.assoc.dul.state_machine.current_state
        try:
            readable, _, _ = select.select([sock], [], [], WAIT if state in _PEER_STATES else 0)
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
        received = self._fill(sock, view)
        del view
        return data if received == nr_bytes else data[:received]

    def recv_into(self, view: memoryview) -> bool:
        """Fill ``view`` from the socket; False when the connection closed first."""
        sock = self.socket
        if sock is None:
            return False
        if isinstance(sock, ssl.SSLSocket):
            data = super().recv(len(view))
            view[: len(data)] = data
            return len(data) == len(view)
        return self._fill(sock, view) == len(view)

    @staticmethod
    def _fill(sock: socket.socket, view: memoryview) -> int:
        """Bytes read into ``view`` until it is full or the connection closed."""
        received = 0
        size = len(view)
        while received < size:
            n = sock.recv_into(view[received:], size - received)
            if not n:  # connection closed: what arrived so far, as pynetdicom does
                break
            received += n
        return received


class _Buffer:
    """The receive buffer of one association: page-aligned (an anonymous mmap), reused for
    each data set and grown when one is larger, so that a stored file can be written from it
    with O_DIRECT (see storage.filestore.FileImage)."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, ALIGNMENT)
        self.view = memoryview(self._map)

    def ensure(self, size: int, keep: int) -> None:
        """Room for ``size`` bytes (rounded up to whole pages), keeping the first ``keep``."""
        if size <= len(self.view):
            return
        grown = mmap.mmap(-1, aligned(max(size, 2 * len(self.view))))
        grown[:keep] = self.view[:keep]
        self.view.release()
        self._map = grown
        self.view = memoryview(grown)


@dataclass
class _Request:
    """A C-STORE request whose data set is still arriving, gathered in the association's
    buffer behind ``prefix`` bytes (the stored file's preamble and file meta)."""

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    buffer: _Buffer | None = None
    prefix: int = 0
    size: int = 0

    def start(self, buffer: _Buffer, prefix: bytes, capacity: int) -> None:
        """Gather the data set in ``buffer``, behind ``prefix``, with room for ``capacity``."""
        self.buffer = buffer
        self.prefix = len(prefix)
        buffer.ensure(self.prefix + capacity, 0)
        buffer.view[: self.prefix] = prefix

    def room(self, n: int) -> memoryview:
        """The next ``n`` bytes of the buffer (grown as needed), for a fragment to go."""
        assert self.buffer is not None
        start = self.prefix + self.size
        self.buffer.ensure(start + n, start)
        return self.buffer.view[start : start + n]

    def add(self, data: memoryview) -> None:
        with self.room(len(data)) as room:
            room[:] = data
        self.size += len(data)

    def data_set(self) -> memoryview:
        assert self.buffer is not None
        return self.buffer.view[self.prefix : self.prefix + self.size]

    def image(self) -> FileImage:
        """Prefix and data set: the stored file's bytes, page-aligned (the buffer is always
        whole pages, so the padding is there already)."""
        assert self.buffer is not None
        length = self.prefix + self.size
        return FileImage(self.buffer.view[: aligned(length)], length)


@dataclass(frozen=True)
class _Echo:
    """A C-ECHO request."""

    context_id: int
    message_id: int
    sop_class_uid: str


class _Unserved(Exception):
    """A message the connection thread leaves to pynetdicom."""


class _ProtocolError(Exception):
    """The peer broke off a message being served: the association is aborted."""


def _command(data: memoryview) -> dict[int, memoryview]:
    """The elements of a command set (group 0000, implicit VR little endian) by element
    number; raises _Unserved when it is not one."""
    elements: dict[int, memoryview] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise _Unserved("command set ends inside an element header")
        group, element, length = _ELEMENT.unpack_from(data, pos)
        pos += 8
        if group != 0x0000 or pos + length > end:
            raise _Unserved("not a command set element")
        elements[element] = data[pos : pos + length]
        pos += length
    return elements


def _us(elements: dict[int, memoryview], element: int) -> int:
    value = elements.get(element)
    if value is None or len(value) != 2:
        raise _Unserved(f"command element (0000,{element:04X}) missing or not US")
    return int(_U16.unpack(value)[0])


def _uid(elements: dict[int, memoryview], element: int) -> str:
    value = elements.get(element)
    if value is None:
        raise _Unserved(f"command element (0000,{element:04X}) missing")
    uid = bytes(value).rstrip(b"\x00 ").decode("ascii", "replace")
    if not uid:
        raise _Unserved(f"command element (0000,{element:04X}) empty")
    return uid


class _DUL(DULServiceProvider):
    """The connection thread of an acceptor association; serves C-STORE and C-ECHO requests
    itself while the association is established (see the module doc)."""

    _store: StoreCallback | None = None
    _prefix: PrefixCallback | None = None
    _buffer: _Buffer | None = None  # made for the first data set
    _pynetdicom_serves = False  # a message went to pynetdicom: it serves the rest
    _request: _Request | None = None
    _transfer_syntaxes: dict[int, str] | None = None
    _capacity = 0  # buffer size for the next data set: the size of the last one

    @property
    def serves_here(self) -> bool:
        """Requests are served by this thread (so far)."""
        return self._store is not None and not self._pynetdicom_serves

    def _serving_here(self) -> bool:
        if self._pynetdicom_serves or self._store is None:
            return False
        if self.state_machine.current_state != "Sta6" or not isinstance(self.socket, _Socket):
            return False
        if self._transfer_syntaxes is None:
            assoc = self.assoc
            if any(assoc.get_handlers(event) for event in _RECV_EVENTS):
                self._pynetdicom_serves = True
                return False
            self._transfer_syntaxes = {
                int(cx.context_id): str(cx.transfer_syntax[0])
                for cx in assoc._accepted_cx.values()
                if cx.context_id is not None and cx.transfer_syntax
            }
        return True

    def _read_pdu_data(self) -> None:
        if not self._serving_here():
            super()._read_pdu_data()
            return
        # The peer's next request follows the response at once: read on while PDUs come
        # (``ready`` waits up to WAIT for one) instead of a trip round the reactor each time.
        while self._read_one_pdu():
            self._idle_timer.restart()
            if (
                self._kill_thread
                or not self.to_provider_queue.empty()
                or not self.event_queue.empty()  # e.g. the connection closed while answering
                or not self._serving_here()
                or not cast(_Socket, self.socket).ready
            ):
                return

    def _read_one_pdu(self) -> bool:
        """Read one PDU; True when it was served here, False when it went to pynetdicom as
        an event (as pynetdicom's own _read_pdu_data does)."""
        sock = self.socket
        assert sock is not None
        try:
            header = sock.recv(6)
            if len(header) != 6:
                self.event_queue.put("Evt17")  # transport connection closed
                return False
            pdu_type, _, length = _PDU_HEADER.unpack(header)
            if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
                logger.error("unknown PDU type 0x%02X received", pdu_type)
                self.event_queue.put("Evt19")  # unrecognised or invalid PDU
                return False
            request = self._request
            if pdu_type == 0x04 and request is not None and length > 6:
                # Most likely one more fragment of the data set being received, alone in
                # its PDU: its value goes straight into the request's buffer.
                pdv = sock.recv(6)
                if len(pdv) != 6:
                    self.event_queue.put("Evt17")
                    return False
                pdv_length, context_id, control = _PDV_HEADER.unpack(pdv)
                if (
                    pdv_length + 4 == length
                    and context_id == request.context_id
                    and control & 0x01 == 0
                ):
                    return self._receive_fragment(sock, request, pdv_length - 2, control)
                body = pdv + sock.recv(length - 6)
            else:
                body = sock.recv(length)
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")
            return False
        if len(body) != length:
            self.event_queue.put("Evt17")
            return False
        try:
            if pdu_type == 0x04 and self._serve_p_data(memoryview(body)):
                return True
        except _ProtocolError as exc:
            # As pynetdicom treats an invalid PDU: A-ABORT to the peer, then close.
            logger.warning("association from %s aborted: %s", self._peer(), exc)
            self._request = None
            self.event_queue.put("Evt19")
            return False
        try:
            pdu, event = self._decode_pdu(header + body)
        except Exception:
            logger.exception("unable to decode the received PDU")
            self.event_queue.put("Evt19")
            return False
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)
        return False

    def _receive_fragment(
        self, sock: AssociationSocket, request: _Request, n: int, control: int
    ) -> bool:
        """Read a data set fragment of ``n`` bytes into the request's buffer; then, if it
        is the last, store the data set and answer."""
        assert isinstance(sock, _Socket)
        with request.room(n) as room:
            whole = sock.recv_into(room)
        if not whole:
            self.event_queue.put("Evt17")  # the connection closed inside the fragment
            return False
        request.size += n
        if control & 0x02:  # last fragment
            self._request = None
            self._complete(request)
        return True

    def _serve_p_data(self, body: memoryview) -> bool:
        """Serve the PDVs of one P-DATA-TF PDU; False (nothing consumed) when it is for
        pynetdicom. A PDU that breaks off a message being served raises _ProtocolError."""
        pdvs = []
        pos, end = 0, len(body)
        while pos < end:
            if pos + 6 > end:
                return self._leave("PDV header runs past the PDU")
            length, context_id, control = _PDV_HEADER.unpack_from(body, pos)
            if length < 2 or pos + 4 + length > end:
                return self._leave("PDV runs past the PDU")
            pdvs.append((context_id, control, body[pos + 6 : pos + 4 + length]))
            pos += 4 + length
        if not pdvs:
            return self._leave("P-DATA-TF without PDVs")
        first: _Request | _Echo | None = None
        if self._request is None:
            # A new message: served here only when its whole command set is in this PDU.
            context_id, control, data = pdvs[0]
            if control & 0x01 == 0 or control & 0x02 == 0:
                return self._leave("message does not start with a whole command set")
            try:
                first = self._message(context_id, data)
            except _Unserved as exc:
                return self._leave(str(exc))
        for i, (context_id, control, data) in enumerate(pdvs):
            self._serve_pdv(context_id, control, data, first if i == 0 else None)
        return True

    def _leave(self, why: str) -> bool:
        # Once per association at most; rare enough to be worth a line.
        logger.info("association from %s: pynetdicom serves it from here (%s)", self._peer(), why)
        self._pynetdicom_serves = True
        return False

    def _peer(self) -> str:
        requestor = self.assoc.requestor
        return f"{str(requestor.ae_title).strip()} at {requestor.address}"

    def _message(self, context_id: int, data: memoryview) -> _Request | _Echo:
        """The request a whole command set starts; raises _Unserved for one not served here."""
        assert self._transfer_syntaxes is not None
        transfer_syntax = self._transfer_syntaxes.get(context_id)
        if transfer_syntax is None:
            raise _Unserved(f"presentation context {context_id} was not accepted")
        elements = _command(data)
        command = _us(elements, 0x0100)
        has_data_set = _us(elements, 0x0800) != _NO_DATA_SET
        message_id = _us(elements, 0x0110)
        sop_class = _uid(elements, 0x0002)
        if command == _C_STORE_RQ and has_data_set:
            return _Request(
                context_id, message_id, sop_class, _uid(elements, 0x1000), transfer_syntax
            )
        if command == _C_ECHO_RQ and not has_data_set:
            return _Echo(context_id, message_id, sop_class)
        raise _Unserved(f"command 0x{command:04X} is not served here")

    def _serve_pdv(
        self, context_id: int, control: int, data: memoryview, parsed: _Request | _Echo | None
    ) -> None:
        request = self._request
        if control & 0x01:  # command fragment
            if request is not None:
                raise _ProtocolError("a command arrived before the data set of the last one ended")
            if control & 0x02 == 0:
                raise _ProtocolError("a fragmented command set after a served message")
            if parsed is None:
                try:
                    parsed = self._message(context_id, data)
                except _Unserved as exc:
                    raise _ProtocolError(
                        f"cannot serve the next message in this PDU: {exc}"
                    ) from exc
            if isinstance(parsed, _Echo):
                self._respond(
                    c_echo_rsp_pdu(parsed.context_id, parsed.message_id, parsed.sop_class_uid, 0)
                )
            else:
                if self._buffer is None:
                    self._buffer = _Buffer()
                prefix = b""
                if self._prefix is not None:
                    prefix = self._prefix(
                        self.assoc,
                        parsed.transfer_syntax,
                        parsed.sop_class_uid,
                        parsed.sop_instance_uid,
                    )
                parsed.start(self._buffer, prefix, self._capacity)
                self._request = parsed
            return
        if request is None:
            raise _ProtocolError("a data set fragment without a command")
        if context_id != request.context_id:
            raise _ProtocolError("a data set fragment on another presentation context")
        request.add(data)
        if control & 0x02:  # last fragment
            self._request = None
            self._complete(request)

    def _complete(self, request: _Request) -> None:
        dataset = request.data_set()
        self._capacity = request.size  # the next data set is likely as large
        store = self._store
        assert store is not None
        try:
            answer = store(
                self.assoc,
                request.transfer_syntax,
                request.sop_class_uid,
                request.sop_instance_uid,
                dataset,
                request.image(),
            )
        except Exception:
            logger.exception("C-STORE %s: the store callback failed", request.sop_instance_uid)
            answer = _HANDLER_FAILED
        status, comment = answer if isinstance(answer, tuple) else (answer, None)
        self._respond(
            c_store_rsp_pdu(
                request.context_id,
                request.message_id,
                request.sop_class_uid,
                request.sop_instance_uid,
                status,
                comment,
            )
        )

    def _respond(self, pdu: bytes) -> None:
        limit = self.assoc.requestor.maximum_length
        if limit and len(pdu) - 6 > limit:
            raise _ProtocolError(f"the peer's maximum PDU length {limit} is below a response's")
        sock = self.socket
        assert sock is not None
        sock.send(pdu)


def install(
    assoc: Any, store: StoreCallback | None = None, prefix: PrefixCallback | None = None
) -> None:
    """Switch a newly created acceptor association to the faster paths (see module doc);
    with ``store`` its connection thread serves C-STORE and C-ECHO requests itself, gathering
    each data set behind what ``prefix`` returns for it."""
    if type(assoc.dimse) is DIMSEServiceProvider:
        assoc.dimse.__class__ = _DIMSE
    if store is not None and type(assoc.dul) is DULServiceProvider:
        assoc.dul.__class__ = _DUL
        cast(_DUL, assoc.dul)._store = store
        cast(_DUL, assoc.dul)._prefix = prefix
        if type(assoc.dul.to_user_queue) is queue.Queue:
            assoc.dul.to_user_queue.__class__ = _WakingQueue
            cast(_WakingQueue, assoc.dul.to_user_queue).wakes = assoc.dimse.msg_queue
    sock = assoc.dul.socket
    if type(sock) is AssociationSocket:
        sock.__class__ = _Socket
