"""A small, fast reader for the few header attributes the index needs.

pydicom builds a full ``Dataset`` with typed values; for a C-STORE that costs more CPU than
storing the instance. This module walks the encoded elements of a dataset up to a stop tag and
returns the wanted top-level values as the text ``str(pydicom value)`` would give, without
building any objects. It handles the common case only: implicit or explicit VR little endian,
values in ASCII (any character set) or Latin-1. Anything else (big endian, deflate, other
character sets with non-ASCII bytes, unexpected VRs, malformed lengths, deep nesting, values
pydicom would convert in other ways) raises :class:`NotHandled` and the caller uses pydicom.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable

from pydicom.datadict import dictionary_VR, tag_for_keyword

from dicomnode.resend import DEFLATED_TRANSFER_SYNTAXES as _DEFLATED

__all__ = ["KNOWN_VRS", "HeaderScanner", "NotHandled"]

_IMPLICIT_LE = "1.2.840.10008.1.2"
# Transfer syntaxes whose dataset is explicit VR little endian, not deflated.
_EXPLICIT_LE = re.compile(r"^1\.2\.840\.10008\.1\.2\.(1|4\.\d+|5)$")

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
_LONG_VRS.add(b"UV")
_SHORT_VRS = {
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
    b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
}  # fmt: skip
KNOWN_VRS = frozenset(_SHORT_VRS | _LONG_VRS)
"""Every value representation, as the two bytes explicit VR encodes."""
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_MAX_DEPTH = 32
_PREFIX = 16384
_CHARSET_TAG = 0x00080005
# Character sets whose non-ASCII bytes pydicom decodes as Latin-1.
_LATIN1_CHARSETS = {"", "ISO_IR 6", "ISO_IR 100"}
# VRs pydicom decodes with the dataset's character set.
_CHARSET_VRS = {"LO", "LT", "PN", "SH", "ST", "UC", "UT"}
_DS = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_IS = re.compile(r"\s*[+-]?\d+\s*")

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TAG = struct.Struct("<HH")


class NotHandled(Exception):
    """The data is outside what the fast reader handles; parse it with pydicom."""


class HeaderScanner:
    """Reads the values of ``keywords`` from encoded datasets; one instance is reusable and
    thread-safe."""

    def __init__(self, keywords: Iterable[str], stop_tag: int) -> None:
        self.stop_tag = stop_tag
        self._wanted: dict[int, tuple[str, str]] = {}
        for keyword in keywords:
            tag = tag_for_keyword(keyword)
            if tag is None:
                raise ValueError(f"{keyword!r} is not a DICOM keyword")
            if tag >= stop_tag:
                continue  # never read (pydicom stops there too)
            vr = dictionary_VR(tag)
            if vr not in _TEXT_VRS and vr not in ("US", "DS", "IS"):
                raise ValueError(f"{keyword} has VR {vr}, which this reader does not convert")
            self._wanted[tag] = (keyword, vr)

    def scan(self, data: bytes | memoryview, transfer_syntax: str) -> dict[str, str]:
        """Keyword -> text of every wanted attribute present (text as ``str()`` of pydicom's
        value, multiple values joined by backslashes, not yet stripped). Raises NotHandled."""
        if transfer_syntax == _IMPLICIT_LE:
            explicit = False
        elif transfer_syntax not in _DEFLATED and _EXPLICIT_LE.match(transfer_syntax):
            explicit = True
        else:
            raise NotHandled(f"transfer syntax {transfer_syntax}")
        # The header is usually a few kilobytes in front of megabytes of pixel data: read a
        # copy of the start, and all of it only when the header does not end there.
        try:
            raw = self._elements(bytes(data[:_PREFIX]), explicit, len(data) <= _PREFIX)
        except NotHandled:
            if len(data) <= _PREFIX:
                raise
            raw = self._elements(bytes(data), explicit, True)
        charset = ""
        if _CHARSET_TAG in raw:
            charset = raw.pop(_CHARSET_TAG)[1].decode("latin-1").strip(" \x00")
        out: dict[str, str] = {}
        for tag, (vr, value) in raw.items():
            keyword, expected = self._wanted[tag]
            if vr != expected:
                raise NotHandled(f"{keyword} has VR {vr}")
            out[keyword] = _convert(vr, value, charset)
        return out

    def _elements(self, buf: bytes, explicit: bool, complete: bool) -> dict[int, tuple[str, bytes]]:
        """Raw values of the wanted elements; ``complete`` is False when ``buf`` is only the
        start of the data (running out of it is then no answer)."""
        wanted = self._wanted
        stop = self.stop_tag
        end = len(buf)
        found: dict[int, tuple[str, bytes]] = {}
        pos = 0
        last = -1
        while pos < end:
            if pos + 8 > end:
                raise NotHandled("truncated element header")
            group, elem = _TAG.unpack_from(buf, pos)
            tag = group << 16 | elem
            if tag >= stop:
                break
            if tag <= last:
                raise NotHandled("elements out of order")
            last = tag
            vr, length, pos = _header(buf, pos, explicit)
            if length == _UNDEFINED:
                if tag in wanted or (explicit and vr not in (b"SQ", b"UN")):
                    raise NotHandled("undefined length outside a sequence")
                pos = _skip_sequence(buf, pos, explicit and vr == b"SQ", 1)
                continue
            if pos + length > end:
                raise NotHandled("value runs past the end of the data")
            if tag in wanted or tag == _CHARSET_TAG:
                if tag == _CHARSET_TAG:
                    vr_name = "CS"
                elif explicit:
                    vr_name = vr.decode("ascii")
                else:
                    vr_name = wanted[tag][1]
                found[tag] = (vr_name, buf[pos : pos + length])
            pos += length
        else:
            if not complete:
                raise NotHandled("the header continues after the prefix")
        return found


def _header(buf: bytes, pos: int, explicit: bool) -> tuple[bytes, int, int]:
    """(VR, value length, value position) of the element header at ``pos``, which the caller
    has checked to hold at least 8 bytes; the VR is empty for implicit VR."""
    if not explicit:
        return b"", _U32.unpack_from(buf, pos + 4)[0], pos + 8
    vr = buf[pos + 4 : pos + 6]
    if vr in _SHORT_VRS:
        return vr, _U16.unpack_from(buf, pos + 6)[0], pos + 8
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise NotHandled("truncated element header")
        return vr, _U32.unpack_from(buf, pos + 8)[0], pos + 12
    raise NotHandled(f"unknown VR {vr!r}")


def _skip_sequence(buf: bytes, pos: int, explicit: bool, depth: int) -> int:
    """Position after an undefined-length sequence whose first item starts at ``pos``."""
    if depth > _MAX_DEPTH:
        raise NotHandled("sequences nested deeply")
    end = len(buf)
    while True:
        if pos + 8 > end:
            raise NotHandled("sequence runs past the end of the data")
        group, elem = _TAG.unpack_from(buf, pos)
        tag = group << 16 | elem
        length = _U32.unpack_from(buf, pos + 4)[0]
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise NotHandled("unexpected element in a sequence")
        if length != _UNDEFINED:
            pos += length
            continue
        pos = _skip_item(buf, pos, explicit, depth)


def _skip_item(buf: bytes, pos: int, explicit: bool, depth: int) -> int:
    """Position after an undefined-length item whose first element starts at ``pos``."""
    end = len(buf)
    while True:
        if pos + 8 > end:
            raise NotHandled("item runs past the end of the data")
        group, elem = _TAG.unpack_from(buf, pos)
        tag = group << 16 | elem
        if tag == _ITEM_END:
            return pos + 8
        vr, length, pos = _header(buf, pos, explicit and group != 0xFFFE)
        if length == _UNDEFINED:
            if explicit and vr not in (b"SQ", b"UN"):
                raise NotHandled("undefined length outside a sequence")
            pos = _skip_sequence(buf, pos, explicit and vr == b"SQ", depth + 1)
        else:
            pos += length


_TEXT_VRS = {"AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UT"}


def _decode(value: bytes, vr: str, charset: str) -> str:
    if vr not in _CHARSET_VRS:
        return value.decode("latin-1")  # pydicom's default for these VRs, any character set
    if b"\x1b" in value:
        raise NotHandled("ISO 2022 escape sequence")  # pydicom switches character sets
    if value.isascii():
        return value.decode("ascii")
    if charset in _LATIN1_CHARSETS:
        return value.decode("latin-1")
    raise NotHandled(f"non-ASCII text in character set {charset!r}")


def _convert(vr: str, value: bytes, charset: str) -> str:
    """The text of ``str(value)`` (values joined by backslashes) as pydicom would read it."""
    if not value:
        return ""
    if vr == "US":
        if len(value) % 2:
            raise NotHandled("US value of odd length")
        return "\\".join(str(v) for v in struct.unpack(f"<{len(value) // 2}H", value))
    text = _decode(value, vr, charset)
    if vr in ("LO", "SH", "UC"):
        return "\\".join(v.rstrip("\x00 ") for v in text.split("\\"))
    if vr in ("LT", "ST", "UT"):
        return text.rstrip("\x00 ")
    if vr == "PN":
        if "=" in text:
            raise NotHandled("person name with component groups")
        return text.rstrip("\x00 ")
    if vr == "DS":
        parts = [v.strip() for v in text.strip().rstrip(" \x00").split("\\")]
        if not all(_DS.fullmatch(v) for v in parts):
            raise NotHandled("DS value pydicom would reformat or reject")
        return "\\".join(parts)
    if vr == "IS":
        if not _IS.fullmatch(text.rstrip("\x00")):
            raise NotHandled("IS value that is not one integer")
        return text.rstrip("\x00 ")
    # AS, CS, DA, DT, TM, UI: split on backslashes after removing trailing padding.
    return text.rstrip(" \x00")
