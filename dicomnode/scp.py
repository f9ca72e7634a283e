"""The C-ECHO / C-STORE SCP.

Handlers are thin: the C-STORE handler hands the received bytes to the ingest path and turns
the outcome into a DIMSE status. Every exception becomes a logged failure status; nothing kills
the association thread. Several processes may serve one listening socket (``node.processes``).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing.sharedctypes
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicomnode import _pynetdicom_fast
from dicomnode.errors import QuarantinedError, StorageError
from dicomnode.ingest import Ingestor, Source, file_meta_bytes
from dicomnode.settings import NodeSettings
from storage.filestore import FileImage

__all__ = ["STATUS", "AssociationLoad", "AssociationStats", "StoreSCP", "listening_socket"]

logger = logging.getLogger(__name__)

_VERIFICATION = "1.2.840.10008.1.1"

# C-STORE statuses we answer with (PS3.4 B.2.3 and PS3.7 C.4.2).
STATUS = {
    "success": 0x0000,
    "out_of_resources": 0xA700,
    "dataset_mismatch": 0xA900,
    "cannot_understand": 0xC210,
    # Our own code in the "cannot understand" range (PS3.4 Cxxx): the instance names another
    # patient than the study it belongs to. Its copy is in quarantine; retrying it unchanged
    # will not help.
    "other_patient": 0xC230,
    "processing_failure": 0x0110,
}
# The answer for quarantined input, by what was wrong with it. An instance whose SOP Instance
# UID is stored already with other content is answered with success, as PACS do (an instance
# of that UID is held, and a failure would make the sender retry it for ever); its copy is in
# quarantine and a warning is logged, so nothing is lost or hidden.
_QUARANTINE_STATUS = {
    "unreadable": STATUS["cannot_understand"],
    "mismatch": STATUS["dataset_mismatch"],
    "conflict": STATUS["success"],
    "other_patient": STATUS["other_patient"],
}


@dataclass
class AssociationStats:
    """What one association did, for its log line."""

    calling_ae: str
    called_ae: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    conflicts: int = 0  # same SOP Instance UID as a stored one, other content (quarantined)
    failed: int = 0
    bytes: int = 0
    studies: set[str] = field(default_factory=set)
    outcome: str = "open"


def listening_socket(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A bound, listening TCP socket that forked serving processes can share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


class AssociationLoad:
    """The associations open in all serving processes, for one limit over them all.

    Each process writes how many associations it has open into its own slot of shared
    memory (created before the serving processes are forked), when one is being negotiated
    and every 0.2 s; the total is the sum of the slots.
    """

    def __init__(self, processes: int = 1) -> None:
        self._slots: Any = multiprocessing.sharedctypes.RawArray(ctypes.c_int, processes)
        self.slot = 0  # this process's; set in each serving process after the fork

    def publish(self, count: int) -> int:
        """Record this process's count; returns the total over all processes."""
        self._slots[self.slot] = count
        return int(sum(self._slots))


_frozen = False


def _freeze_startup_objects() -> None:
    """Leave the objects that exist when serving starts out of garbage collections, once per
    process. pynetdicom's server loop runs a full ``gc.collect()`` every 60 turns; over the
    ~100k objects of the imported modules that took ~0.1 s each time. They live as long as
    the process."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.freeze()


class _Server(ThreadedAssociationServer):
    """An association server on an already listening socket, TCP_NODELAY on every peer."""

    daemon_threads = True
    block_on_close = False
    shared_socket: socket.socket | None = None
    processes = 1  # serving processes sharing the socket

    def server_bind(self) -> None:
        shared = type(self).shared_socket
        assert shared is not None
        if self.socket is not None:
            self.socket.close()
        self.socket = shared
        # Non-blocking accept: when several processes share the socket only one wins a
        # connection; the others must not block in accept().
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """The shared socket is already listening."""

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        if type(self).processes > 1:
            # Every serving process wakes for a new connection and the first accept() wins:
            # a process that is already busy lets idle ones go first, so associations spread
            # over the processes (each has its own GIL) instead of piling up in one.
            busy = len(self.active_associations)
            if busy:
                time.sleep(min(0.002 * busy, 0.02))
        client, address = self.socket.accept()
        client.setblocking(True)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def server_close(self) -> None:
        # The shared socket belongs to the parent; only stop serving here.
        pass

    def service_actions(self) -> None:
        """Between requests (at least every poll interval): publish the associations open."""
        scp: StoreSCP = cast(Any, self).dicomnode_scp
        scp.publish_load()


class _Handler(RequestHandler):
    """Refuses callers the allow-list does not admit with a proper A-ASSOCIATE-RJ."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        scp: StoreSCP = cast(Any, self.server).dicomnode_scp
        _pynetdicom_fast.install(assoc, scp.store, scp.file_prefix)
        peer = str(self.client_address[0])
        acse = assoc.acse
        negotiate = acse._negotiate_as_acceptor

        def checked() -> None:
            request = cast(Any, assoc.requestor.primitive)
            calling = str(request.calling_ae_title).strip()
            called = str(request.called_ae_title).strip()
            reason = scp.refusal(calling, called, peer)
            if reason is None:
                total = scp.publish_load()
                if total <= scp.settings.max_associations:
                    negotiate()
                    return
                reason = (
                    f"{total - 1} associations already open, node.max_associations is "
                    f"{scp.settings.max_associations}"
                )
                # 0x02 rejected-transient, source 0x03 service-provider (presentation),
                # 0x02 local limit exceeded: the caller may try again later.
                rejection = (0x02, 0x03, 0x02)
            else:
                # 0x01 rejected-permanent, source 0x01 service-user, 0x03 calling AE not
                # recognised or 0x07 called AE not recognised.
                rejection = (0x01, 0x01, 0x07 if reason.startswith("called") else 0x03)
            logger.warning("association refused: calling AE %r from %s: %s", calling, peer, reason)
            acse.send_reject(*rejection)
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()

        acse._negotiate_as_acceptor = checked  # type: ignore[method-assign]
        return assoc


class StoreSCP:
    """The storage SCP of one process; ``serve_forever`` blocks until ``shutdown``."""

    def __init__(
        self,
        settings: NodeSettings,
        ingestor: Ingestor,
        sock: socket.socket,
        *,
        require_called_ae: bool = False,
        on_association_end: Callable[[AssociationStats], None] | None = None,
        load: AssociationLoad | None = None,
    ) -> None:
        self.settings = settings
        self.ingestor = ingestor
        self.load = load if load is not None else AssociationLoad()
        self.require_called_ae = require_called_ae
        self.on_association_end = on_association_end
        self._stats: dict[int, AssociationStats] = {}
        self._lock = threading.Lock()
        # pynetdicom's per-message debug handlers cost ~15 % CPU; accept any storage class.
        _config.LOG_HANDLER_LEVEL = "none"
        _config.UNRESTRICTED_STORAGE_SERVICE = True
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.add_supported_context(_VERIFICATION)
        self.ae.maximum_associations = settings.max_associations
        self.ae.maximum_pdu_size = settings.maximum_pdu_size
        self.ae.network_timeout = settings.network_timeout
        self.ae.acse_timeout = 30
        self.ae.dimse_timeout = settings.network_timeout
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        server_cls = type(
            "_BoundServer",
            (_Server,),
            {"shared_socket": sock, "processes": settings.processes},
        )
        self.server: Any = self.ae.make_server(  # returns our _BoundServer
            sock.getsockname()[:2],
            evt_handlers=handlers,
            server_class=server_cls,
            request_handler=_Handler,
        )
        cast(Any, self.server).dicomnode_scp = self
        # Registered like start_server() does, so the association limit counts this server.
        self.ae._servers.append(self.server)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def publish_load(self) -> int:
        """Publish this process's open associations; the total over all serving processes."""
        count = sum(1 for assoc in self.ae.active_associations if assoc.is_acceptor)
        return self.load.publish(count)

    def refusal(self, calling: str, called: str, peer: str) -> str | None:
        """Why an association would be refused, or None when it is admitted."""
        if self.require_called_ae and called != self.settings.ae_title:
            return f"called AE {called!r} is not this node's AE title {self.settings.ae_title!r}"
        if not self.settings.admits(calling, peer):
            return "calling AE title and address are not in node.allowed_calling_aes"
        return None

    def serve_forever(self) -> None:
        _freeze_startup_objects()
        self.server.serve_forever(poll_interval=0.2)

    def shutdown(self) -> None:
        self.server.shutdown()
        for assoc in self.server.active_associations:
            assoc.abort()

    # --- handlers ------------------------------------------------------------------------

    def _on_echo(self, event: Any) -> int:
        return 0x0000

    def _on_accepted(self, event: Any) -> None:
        assoc = event.assoc
        # The called AE title the requestor asked for (pynetdicom sets the acceptor's title
        # to our own): several titles may point at one node, and rules route on it.
        request = getattr(assoc.requestor, "primitive", None)
        called = getattr(request, "called_ae_title", None) or assoc.acceptor.ae_title
        stats = AssociationStats(
            calling_ae=str(assoc.requestor.ae_title).strip(),
            called_ae=str(called).strip(),
            peer=f"{assoc.requestor.address}:{assoc.requestor.port}",
        )
        with self._lock:
            self._stats[id(assoc)] = stats

    def _on_released(self, event: Any) -> None:
        stats = self._stats.get(id(event.assoc))
        if stats is not None:
            stats.outcome = "released"

    def _on_aborted(self, event: Any) -> None:
        stats = self._stats.get(id(event.assoc))
        if stats is not None:
            stats.outcome = "aborted"

    def _on_closed(self, event: Any) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        if stats.outcome == "open":
            # A peer's A-ABORT closes the connection before the association thread reports
            # EVT_ABORTED; the abort indication is already queued for it.
            aborted = event.assoc.is_aborted or event.assoc.acse.is_aborted()
            stats.outcome = "aborted" if aborted else "connection closed"
        seconds = time.monotonic() - stats.started
        logger.info(
            "association %s from %s to %s: %d stored, %d duplicate, %d conflicting, %d failed, "
            "%d bytes, %.2f s, %s",
            stats.calling_ae,
            stats.peer,
            stats.called_ae,
            stats.stored,
            stats.duplicates,
            stats.conflicts,
            stats.failed,
            stats.bytes,
            seconds,
            stats.outcome,
        )
        try:
            self.ingestor.touch(stats.studies)
        except Exception:
            logger.exception("could not restart the quiet period of %d studies", len(stats.studies))
        if self.on_association_end is not None:
            self.on_association_end(stats)

    def _on_store(self, event: Any) -> int | Dataset:
        """EVT_C_STORE, for associations pynetdicom serves itself (see _pynetdicom_fast)."""
        req = event.request
        answer = self.store(
            event.assoc,
            str(event.context.transfer_syntax),
            str(req.AffectedSOPClassUID),
            str(req.AffectedSOPInstanceUID),
            req.DataSet.getbuffer(),
            None,
        )
        if isinstance(answer, int):
            return answer
        status = Dataset()
        status.Status, status.ErrorComment = answer
        return status

    def file_prefix(
        self, assoc: Any, transfer_syntax: str, sop_class_uid: str, sop_instance_uid: str
    ) -> bytes:
        """The stored file's preamble and file meta for a data set about to be received (the
        file is written from the receive buffer as it is, when the data set matches)."""
        stats = self._stats.get(id(assoc))
        calling = stats.calling_ae if stats else ""
        return file_meta_bytes(sop_class_uid, sop_instance_uid, transfer_syntax, calling)

    def store(
        self,
        assoc: Any,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        dataset: bytes | memoryview,
        image: FileImage | None,
    ) -> int | tuple[int, str]:
        """Ingest one received data set; the C-STORE status to answer with, and for a refused
        instance an Error Comment saying why (the whole reason is in the quarantine).
        ``image`` is the file to store, when the data set was received behind
        :meth:`file_prefix` in one aligned buffer."""
        stats = self._stats.get(id(assoc))
        try:
            source = Source(
                kind="dicom",
                calling_ae=stats.calling_ae if stats else None,
                called_ae=stats.called_ae if stats else None,
                peer_address=str(assoc.requestor.address),
            )
            result = self.ingestor.ingest_network(
                dataset, transfer_syntax, sop_class_uid, sop_instance_uid, source, image
            )
        except QuarantinedError as exc:
            status = _QUARANTINE_STATUS.get(exc.kind, STATUS["cannot_understand"])
            if status == STATUS["success"]:
                if stats is not None:
                    stats.conflicts += 1
                return status
            self._count_failure(stats)
            return status, _error_comment(exc.reason)
        except StorageError as exc:
            # The message names the cause (disk full, database unreachable); a traceback for
            # every instance of an association would bury it.
            logger.error("C-STORE %s not stored: %s", sop_instance_uid, exc)
            self._count_failure(stats)
            return STATUS["out_of_resources"]
        except Exception:
            logger.exception("C-STORE %s failed unexpectedly", sop_instance_uid)
            self._count_failure(stats)
            return STATUS["processing_failure"]
        if stats is not None:
            if result.duplicate:
                stats.duplicates += 1
            else:
                stats.stored += 1
                stats.bytes += result.size_bytes
            stats.studies.add(result.study_instance_uid)
        return STATUS["success"]

    @staticmethod
    def _count_failure(stats: AssociationStats | None) -> None:
        if stats is not None:
            stats.failed += 1


def _error_comment(reason: str) -> str:
    """A quarantine reason as an Error Comment (LO: 64 characters, no backslash)."""
    text = reason.replace("\\", "/").encode("ascii", "replace").decode()
    text = text.removeprefix("cannot index dataset: ")
    return text if len(text) <= 64 else text[:61] + "..."
