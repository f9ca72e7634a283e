"""C-STORE SCU: send stored instances to a destination, as stored, checking every status.

One association per batch of up to 128 distinct (SOP class, transfer syntax) presentation
contexts; TCP_NODELAY on; the dataset bytes are sent as they lie on disk (no decoding).
A registry entry with ``tls: true`` is reached over TLS, its certificate verified.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset

from dicomnode.errors import DicomNodeError
from dicomnode.settings import RemoteNode

__all__ = [
    "DeliveryError",
    "Outgoing",
    "describe_failure",
    "is_delivered_status",
    "rejection",
    "send_instances",
    "tls_args",
]

logger = logging.getLogger(__name__)

_MAX_CONTEXTS = 128
_DUL_POLL_SECONDS = 0.0001
_P_DATA_TF = 0x04


class DeliveryError(DicomNodeError):
    """A destination could not be reached or refused the association."""


@dataclass(frozen=True)
class Outgoing:
    """One stored instance to send; ``key`` identifies it in the result."""

    key: int
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def is_delivered_status(status: int | None) -> bool:
    """Success, or a warning status with which the destination still stored the instance."""
    return status is not None and (status == 0x0000 or (status & 0xF000) == 0xB000)


def tls_args(remote: RemoteNode) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` (context, server hostname) for ``remote``; None without TLS.

    Raises DeliveryError when its TLS files cannot be used (removed or changed since start).
    """
    if not remote.tls:
        return None
    try:
        return remote.ssl_context(), remote.host
    except ValueError as exc:
        raise DeliveryError(f"{_where(remote)}: {exc}") from exc


# The probe connection that names a connection failure waits at most this long (seconds).
_PROBE_SECONDS = 5.0

# (result source, diagnostic) of an A-ASSOCIATE-RJ (PS3.8 9.3.4) -> what to do about it.
_REJECTION_HINTS = {
    (1, 1): "it gave no reason; its log may say why (allowed callers, called AE title)",
    (1, 2): "it does not support the DICOM application context",
    (1, 3): "it does not accept our calling AE title {calling}: add {calling} to its allowed "
    "callers",
    (1, 7): "it does not answer to the called AE title {called}: use the AE title it is "
    "configured with",
    (2, 1): "it gave no reason; its log may say why",
    (2, 2): "it does not support our protocol version",
    (3, 1): "it is busy: try again later",
    (3, 2): "it has too many associations open: try again later",
}


def rejection(assoc: Any) -> tuple[int, int, int] | None:
    """(result, source, diagnostic) of the A-ASSOCIATE-RJ that refused ``assoc``; None when
    it was not rejected."""
    rsp = getattr(assoc.acceptor, "primitive", None) if assoc.is_rejected else None
    if rsp is None:
        return None
    return int(rsp.result), int(rsp.result_source), int(rsp.diagnostic)


def describe_failure(remote: RemoteNode, assoc: Any, calling_ae: str, timeout: float) -> str:
    """Why no association with ``remote`` was established, with what to check.

    A rejection is described from the peer's A-ASSOCIATE-RJ (result, source, reason). Anything
    else is told apart by connecting once more on its own (pynetdicom only logs why it could
    not): connection refused, timed out, host unknown, or over TLS the handshake's failure
    (an untrusted certificate, a wrong host name, a refused client certificate).
    """
    where = _where(remote)
    if assoc.is_rejected:
        return f"{where} refused the association: {_rejection_text(remote, assoc, calling_ae)}"
    problem = _tls_problem(remote, timeout) if remote.tls else _tcp_problem(remote, timeout)
    if problem is not None:
        return f"{where}: {problem}"
    return (
        f"{where} accepted the connection but not the association request: it closed the "
        f"connection or sent no answer within {timeout:g} s (is a DICOM node listening on that "
        f"port{'' if remote.tls else ', or does it expect TLS'}?)"
    )


def _rejection_text(remote: RemoteNode, assoc: Any, calling_ae: str) -> str:
    rsp = assoc.acceptor.primitive
    found = rejection(assoc)
    if found is None:
        return "no A-ASSOCIATE-RJ details"
    result, source, diagnostic = found
    hint = _REJECTION_HINTS.get((source, diagnostic), "its log may say why")
    if result == 2 and "try again" not in hint:
        hint += "; the rejection is transient: try again later"
    return f"{rsp.reason_str} ({rsp.result_str}, from the {rsp.source_str}); " + hint.format(
        calling=calling_ae, called=remote.ae_title
    )


def _where(remote: RemoteNode) -> str:
    return f"{remote.ae_title}@{remote.host}:{remote.port}{' (TLS)' if remote.tls else ''}"


def _connect_problem(exc: OSError, remote: RemoteNode, timeout: float) -> str:
    """What a failed TCP connect to ``remote`` means, with what to check."""
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"connection refused: nothing listens on port {remote.port} of {remote.host} "
            "(check host and port, and that the peer is running)"
        )
    if isinstance(exc, TimeoutError):
        return (
            f"connection timed out: no answer from {remote.host}:{remote.port} within "
            f"{timeout:g} s (check host, port and firewalls on the way)"
        )
    if isinstance(exc, socket.gaierror):
        return f"host {remote.host!r} is unknown ({exc.strerror or exc}; check host)"
    return f"cannot connect: {exc.strerror or exc} (check host and port)"


def _tcp_problem(remote: RemoteNode, timeout: float) -> str | None:
    """What fails when a TCP connection to ``remote`` is opened; None if nothing does."""
    try:
        with socket.create_connection(
            (remote.host, remote.port), timeout=min(timeout, _PROBE_SECONDS)
        ):
            return None
    except OSError as exc:
        return _connect_problem(exc, remote, timeout)


def _tls_problem(remote: RemoteNode, timeout: float) -> str | None:
    """What fails when a TLS connection to ``remote`` is opened; None if nothing does."""
    args = tls_args(remote)
    assert args is not None
    context, hostname = args
    try:
        with (
            socket.create_connection((remote.host, remote.port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=hostname) as conn,
        ):
            # With TLS 1.3 a peer that refuses our certificate says so after the handshake.
            conn.settimeout(min(timeout, 1.0))
            with contextlib.suppress(TimeoutError):
                conn.recv(1)
    except ssl.SSLCertVerificationError as exc:
        return (
            f"TLS: its certificate is not trusted: {exc.verify_message} (tls_ca must hold the "
            "CA that signed it, and unless tls_verify_hostname is false it must name host)"
        )
    except ssl.SSLError as exc:
        return (
            f"TLS handshake failed: {exc.reason or exc} (does it speak TLS on this port, and "
            "does it require or refuse our client certificate, tls_cert?)"
        )
    except OSError as exc:
        return _connect_problem(exc, remote, timeout)
    return None


def _nodelay(event: Any) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _quick_poll(event: Any) -> None:
    # pynetdicom's upper-layer thread sleeps 1 ms whenever it finds nothing to do; with one
    # C-STORE in flight at a time that sleep lands on every response. 0.1 ms polls cost a
    # little CPU for the length of one association only.
    event.assoc.dul._run_loop_delay = _DUL_POLL_SECONDS


def _batches(items: list[Outgoing]) -> list[list[Outgoing]]:
    batches: list[list[Outgoing]] = []
    current: list[Outgoing] = []
    contexts: set[tuple[str, str]] = set()
    for item in items:
        cx = (item.sop_class_uid, item.transfer_syntax_uid)
        if cx not in contexts and len(contexts) == _MAX_CONTEXTS:
            batches.append(current)
            current, contexts = [], set()
        contexts.add(cx)
        current.append(item)
    if current:
        batches.append(current)
    return batches


def send_instances(
    remote: RemoteNode,
    items: list[Outgoing],
    *,
    calling_ae: str,
    timeout: float = 30.0,
    on_status: Callable[[Outgoing, int | None], None] | None = None,
) -> dict[int, int | None]:
    """Send ``items``; returns key -> DIMSE status (None when not sent).

    Raises DeliveryError when no association can be established at all.
    """
    statuses: dict[int, int | None] = {item.key: None for item in items}
    for batch in _batches(items):
        ae = AE(ae_title=calling_ae)
        # connection_timeout also bounds the TLS handshake (pynetdicom's default: none)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
        ae.maximum_pdu_size = 0
        for sop_class, ts in sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in batch}):
            ae.add_requested_context(sop_class, [ts])
        assoc = ae.associate(
            remote.host,
            remote.port,
            ae_title=remote.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay), (evt.EVT_CONN_OPEN, _quick_poll)],
            tls_args=tls_args(remote),
        )
        if not assoc.is_established:
            raise DeliveryError(describe_failure(remote, assoc, calling_ae, timeout))
        try:
            contexts: dict[tuple[str, str], int] = {
                (str(cx.abstract_syntax), str(cx.transfer_syntax[0])): cx.context_id
                for cx in assoc.accepted_contexts
                if cx.context_id is not None
            }
            _pause_reactor(assoc)
            try:
                for msg_id, item in enumerate(batch, start=1):
                    cx_id = contexts.get((item.sop_class_uid, item.transfer_syntax_uid))
                    if cx_id is None:
                        logger.warning(
                            "%s does not accept %s in transfer syntax %s",
                            remote.ae_title,
                            item.sop_class_uid,
                            item.transfer_syntax_uid,
                        )
                        continue
                    if not assoc.is_established:
                        break
                    status = _send_one(assoc, cx_id, msg_id % 0x10000 or 1, item, timeout)
                    statuses[item.key] = status
                    if on_status is not None:
                        on_status(item, status)
            finally:
                assoc._reactor_checkpoint.set()  # let the reactor run (and end) again
        finally:
            if assoc.is_established:
                assoc.release()
    return statuses


# pynetdicom's ``send_c_store`` pauses the association's reactor thread for each request and
# lets it run in between: the next request then waits up to 1 ms for it to pause again, and a
# reactor that has not yet seen the pause can take the next response off the queue ("Received
# unexpected C-STORE service message", then a DIMSE timeout). A requestor that only sends
# C-STOREs needs nothing from the reactor, so it stays paused for the whole batch and the
# requests and responses below go through pynetdicom's DIMSE and upper-layer parts directly.


def _pause_reactor(assoc: Any) -> None:
    """Pause the association's reactor; it is resumed with ``_reactor_checkpoint.set()``."""
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)


def _send_one(assoc: Any, cx_id: int, msg_id: int, item: Outgoing, timeout: float) -> int | None:
    """One C-STORE of the file's dataset bytes as stored; the response status, or None."""
    req = C_STORE()
    req.MessageID = msg_id
    req.AffectedSOPClassUID = item.sop_class_uid
    req.AffectedSOPInstanceUID = item.sop_instance_uid
    req.Priority = 2  # low, the default of pynetdicom and DCMTK
    try:
        _, offset = split_dataset(item.path)
        req._dataset_path = (item.path, offset)  # pynetdicom's chunked-send hook
        msg = C_STORE_RQ()
        msg.primitive_to_message(req)
        msg.context_id = cx_id
        # Read every fragment before the first byte is sent: a file that cannot be read
        # fails alone and leaves the association usable.
        fragments = list(msg.encode_msg(cx_id, assoc.dimse.maximum_pdu_size))
    except (OSError, ValueError, InvalidDicomError) as exc:
        logger.warning("cannot send %s: %s", item.path, exc)
        return None
    sock = assoc.dul.socket.socket
    try:
        if isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket):
            # One write of all P-DATA-TF PDUs instead of one upper-layer state-machine pass
            # per 16 KB fragment. Over TLS the upper-layer thread must do all socket I/O.
            sock.sendall(b"".join(_p_data_tf(fragment) for fragment in fragments))
        else:
            for fragment in fragments:
                assoc.dul.send_pdu(fragment)
    except OSError as exc:
        logger.warning("connection lost while sending %s: %s", item.path, exc)
        assoc.abort()
        return None
    return _await_status(assoc, msg_id, timeout)


def _p_data_tf(primitive: Any) -> bytes:
    """A P-DATA-TF PDU (PS3.8 9.3.5) from a P-DATA primitive's (context ID, PDV) list."""
    items = b"".join(
        struct.pack(">IB", len(pdv) + 1, cx_id) + pdv
        for cx_id, pdv in primitive.presentation_data_value_list
    )
    return struct.pack(">BBI", _P_DATA_TF, 0, len(items)) + items


def _await_status(assoc: Any, msg_id: int, timeout: float) -> int | None:
    """The status of the response to ``msg_id``; None (association aborted) on a timeout,
    a peer abort or an answer that does not fit."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, rsp = assoc.dimse.msg_queue.get(timeout=0.1)
            break
        except queue.Empty:
            if not assoc.dul.is_alive() or assoc.acse.is_aborted():
                logger.warning("the peer ended the association during a C-STORE")
                assoc.kill()
                return None
            if time.monotonic() > deadline:
                logger.warning("no C-STORE response within %.0f s", timeout)
                assoc.abort()
                return None
    status = getattr(rsp, "Status", None)
    if not isinstance(rsp, C_STORE) or rsp.MessageIDBeingRespondedTo != msg_id or status is None:
        logger.warning("unexpected answer to C-STORE request %d: %r", msg_id, rsp)
        assoc.abort()
        return None
    return int(status)
