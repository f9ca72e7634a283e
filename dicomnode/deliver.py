"""C-STORE SCU: send stored instances to a destination, as stored, checking every status.

One association per batch of up to 128 distinct (SOP class, transfer syntax) presentation
contexts; TCP_NODELAY on; the dataset bytes are sent as they lie on disk (no decoding).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config, evt

from dicomnode.errors import DicomNodeError
from dicomnode.settings import RemoteNode

__all__ = ["DeliveryError", "Outgoing", "is_delivered_status", "send_instances"]

logger = logging.getLogger(__name__)

_MAX_CONTEXTS = 128


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


def _nodelay(event: Any) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, never re-encode
    statuses: dict[int, int | None] = {item.key: None for item in items}
    for batch in _batches(items):
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.maximum_pdu_size = 0
        for sop_class, ts in sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in batch}):
            ae.add_requested_context(sop_class, [ts])
        assoc = ae.associate(
            remote.host,
            remote.port,
            ae_title=remote.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)],
        )
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "did not answer"
            raise DeliveryError(
                f"{remote.ae_title}@{remote.host}:{remote.port} {why} "
                f"(check host, port and that it knows our AE title {calling_ae})"
            )
        try:
            accepted = {
                (cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
            }
            for item in batch:
                if (item.sop_class_uid, item.transfer_syntax_uid) not in accepted:
                    logger.warning(
                        "%s does not accept %s in transfer syntax %s",
                        remote.ae_title,
                        item.sop_class_uid,
                        item.transfer_syntax_uid,
                    )
                    continue
                if not assoc.is_established:
                    break
                status = _send_one(assoc, item)
                statuses[item.key] = status
                if on_status is not None:
                    on_status(item, status)
        finally:
            if assoc.is_established:
                assoc.release()
    return statuses


def _send_one(assoc: Any, item: Outgoing) -> int | None:
    try:
        rsp = assoc.send_c_store(item.path)
    except (OSError, ValueError, AttributeError) as exc:
        logger.warning("cannot send %s: %s", item.path, exc)
        return None
    status = getattr(rsp, "Status", None)
    return int(status) if status is not None else None
