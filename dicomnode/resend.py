"""Is an instance sent again the one already stored, or other content under the same UID?

A SOP Instance UID names one instance. A sender that sends it again (a retry, a study sent
twice, from the modality and later from the PACS) sends the same data set, perhaps in another
transfer syntax: that is a duplicate, counted and not stored twice. The same UID with another
data set in the same transfer syntax, or under another study or series, is a conflict: what
was stored first is kept (results may have been made from it already) and the new copy goes
to quarantine with a reason that names what differs.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable

__all__ = ["DEFLATED_TRANSFER_SYNTAXES", "conflict", "dataset_part"]

# Transfer syntaxes whose whole data set is deflated (not only the pixel data frames).
DEFLATED_TRANSFER_SYNTAXES = frozenset(
    ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205")
)
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR"))
_LONG_VRS |= {b"UT", b"SV", b"UV"}


def dataset_part(data: bytes | memoryview) -> memoryview:
    """The data set of a DICOM file: what follows the preamble and file meta group (0002),
    if there are any; the whole of ``data`` for a bare data set."""
    view = memoryview(data)
    pos = 132 if bytes(view[128:132]) == b"DICM" else 0
    # File meta elements are explicit VR little endian, group 0002, in order.
    while pos + 8 <= len(view) and bytes(view[pos : pos + 2]) == b"\x02\x00":
        vr = bytes(view[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > len(view):
                break
            pos += 12 + struct.unpack_from("<I", view, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", view, pos + 6)[0]
    return view[min(pos, len(view)) :]


def _plain(data: bytes | memoryview, transfer_syntax: str) -> bytes:
    if transfer_syntax in DEFLATED_TRANSFER_SYNTAXES:
        try:
            return zlib.decompress(bytes(data), -zlib.MAX_WBITS)
        except zlib.error:
            pass
    return bytes(data)


def conflict(
    stored: bytes,
    stored_transfer_syntax: str,
    received: Iterable[bytes | memoryview],
    received_transfer_syntax: str,
    *,
    same_place: bool,
) -> str | None:
    """Why a received copy of an indexed instance is not that instance, or None when it is.

    ``stored`` is the stored file's content; ``received`` the chunks of the new copy (file
    meta, if any, then data set); ``same_place`` is True when both name the same study and
    series UIDs (the stored file's path is derived from them).
    """
    if not same_place:
        return "it names another study or series than the stored copy"
    if stored_transfer_syntax != received_transfer_syntax:
        return None  # the same instance in another encoding
    new = b"".join(bytes(c) for c in received)
    ours = _plain(dataset_part(stored), stored_transfer_syntax)
    theirs = _plain(dataset_part(new), received_transfer_syntax)
    if ours == theirs:
        return None
    return "its data set differs from the stored copy's in the same transfer syntax"
