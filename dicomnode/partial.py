"""Is a DICOM file on disk complete, or is its writer still adding to it?

The check walks element headers only (lengths, items, delimiters), never decoding values, so
it costs a few hundred small reads however large the file. It is conservative: it reports a
file as certainly unfinished only when its own structure says data is missing (an element or
item that runs past the end, a sequence never closed, a deflated stream that has not ended).
A file that is merely short so far is reported as unfinished but not certain: one shorter
than a DICOM header, and an image (a storage SOP class whose instances carry pixel data: CT,
MR, PET, CR, DX, US, secondary capture, enhanced multi-frame, segmentation, parametric map,
...) without pixel data yet, which is what a writer leaves behind when it pauses anywhere
before the pixel data. Data it cannot make sense of is left to the ingest path to judge.
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.uid import UID

from dicomnode.resend import DEFLATED_TRANSFER_SYNTAXES

__all__ = ["Unfinished", "unfinished", "unfinished_dataset"]

_LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV")
)
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_MAX_DEPTH = 64
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
# Transfer syntaxes whose data set is deflated as a whole (PS3.5 A.5, A.7, A.12). Not Deflated
# Image Frame Compression (1.2.840.10008.1.2.8.1): only its frames are deflated.
_DEFLATED = DEFLATED_TRANSFER_SYNTAXES
_SOP_CLASS = 0x00080016
_ROWS = 0x00280010
_PIXEL_TAGS = frozenset((0x7FE00008, 0x7FE00009, 0x7FE00010))
# Storage SOP classes whose instances always carry pixel data although their registered name
# does not say "Image Storage"; newer ones than pydicom's registry are listed too.
_PIXEL_CLASSES = frozenset(
    (
        "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
        "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map (float pixel data)
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
        "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation
        "1.2.840.10008.5.1.4.1.1.66.8",  # Height Map Segmentation
        "1.2.840.10008.5.1.4.1.1.81.1",  # Ophthalmic Thickness Map
        "1.2.840.10008.5.1.4.1.1.82.1",  # Corneal Topography Map
    )
)


@dataclass(frozen=True)
class Unfinished:
    """Why a file looks unfinished; ``certain`` is False when it is merely too short so far
    (it could as well be a small file that is not DICOM at all)."""

    reason: str
    certain: bool = True


class _Truncated(Exception):
    pass


class _Unknown(Exception):
    pass


def unfinished(data: bytes) -> Unfinished | None:
    """Why ``data`` (a file's content) looks partly written, or None if it looks whole."""
    if not data:
        return Unfinished("the file is empty", certain=False)
    buf = memoryview(data)
    return _judge(lambda: _check(buf, len(buf)))


def unfinished_dataset(data: bytes | memoryview, transfer_syntax: str) -> Unfinished | None:
    """Why a bare data set (as C-STORE carries it, no file meta) encoded in
    ``transfer_syntax`` looks cut short, or None if it looks whole."""
    buf = memoryview(data)
    return _judge(lambda: _check_dataset(buf, 0, len(buf), transfer_syntax))


def _judge(check: Callable[[], None]) -> Unfinished | None:
    try:
        check()
    except _TooShort as exc:
        return Unfinished(str(exc), certain=False)
    except _Truncated as exc:
        return Unfinished(str(exc))
    except (_Unknown, struct.error, zlib.error, IndexError, ValueError):
        return None
    return None


def _check(buf: memoryview, size: int) -> None:
    if size < 132:
        if bytes(buf[128:size]) == b"DICM"[: max(0, size - 128)]:
            raise _TooShort(size)
        _check_bare(buf, size)
        return
    if bytes(buf[128:132]) != b"DICM":
        _check_bare(buf, size)
        return
    pos, ts, sop_class = _file_meta(buf, size)
    _check_dataset(buf, pos, size, ts, sop_class)


def _check_dataset(buf: memoryview, pos: int, size: int, ts: str, sop_class: str = "") -> None:
    if ts in _DEFLATED:
        _check_deflated(buf[pos:size])
    else:
        explicit, little = ts != _IMPLICIT_LE, ts != _EXPLICIT_BE
        _dataset(buf, pos, size, explicit=explicit, little=little, sop_class=sop_class)


def _dataset(
    buf: memoryview, pos: int, size: int, *, explicit: bool, little: bool, sop_class: str = ""
) -> None:
    """Walk the top-level dataset, then check that an image has its pixel data.
    ``sop_class`` is the file meta's Media Storage SOP Class UID, if any."""
    if pos == size:
        raise _Truncated("the file ends before any data")
    if size - pos >= 8:
        # Trust the data over the declared transfer syntax for VR, as pydicom does.
        vr = bytes(buf[pos + 4 : pos + 6])
        explicit = vr.isalpha() and vr.isupper()
    tags: dict[int, tuple[int, int]] = {}
    _walk(buf, pos, size, explicit=explicit, little=little, depth=0, in_item=False, tags=tags)
    if tags.keys() & _PIXEL_TAGS:
        return
    # Cut anywhere before the pixel data, an image still walks as whole: wait for it, but
    # let the ingest path judge it if its writer says it is finished.
    if _SOP_CLASS in tags:
        start, length = tags[_SOP_CLASS]
        sop_class = _text(buf[start : start + min(length, 64)])
    if _carries_pixels(sop_class):
        name = UID(sop_class).name
        what = "an image" if name == sop_class else f"a {name} instance"
        raise _TooShort(size, f"{what} without pixel data (yet)")
    if _ROWS in tags:
        raise _TooShort(size, "image attributes but no pixel data (yet)")


@functools.lru_cache(maxsize=256)
def _carries_pixels(sop_class: str) -> bool:
    """Whether instances of this storage SOP class always have pixel data."""
    if sop_class in _PIXEL_CLASSES:
        return True
    uid = UID(sop_class)
    return uid.type == "SOP Class" and "Image Storage" in uid.name


def _text(value: memoryview) -> str:
    return bytes(value).decode("ascii", "replace").strip("\x00 ")


class _TooShort(_Truncated):
    def __init__(self, size: int, why: str = "less than a DICOM file header") -> None:
        super().__init__(f"only {size} bytes so far, {why}")


def _check_bare(buf: memoryview, size: int) -> None:
    """A dataset without preamble (old exports); same guess as the ingest path."""
    if size < 8:
        raise _TooShort(size)
    group = struct.unpack_from("<H", buf, 0)[0]
    if group not in (0x0002, 0x0008):
        raise _Unknown
    _dataset(buf, 0, size, explicit=True, little=True)


def _file_meta(buf: memoryview, size: int) -> tuple[int, str, str]:
    """Skip group 0002 (always explicit VR little endian); returns (end, transfer syntax,
    media storage SOP class)."""
    pos = 132
    ts = sop_class = ""
    while True:
        if size - pos < 8:
            raise _Truncated("the file ends inside the file meta information")
        group, element = struct.unpack_from("<HH", buf, pos)
        if group != 0x0002:
            return pos, ts, sop_class
        vr = bytes(buf[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if size - pos < 12:
                raise _Truncated("the file ends inside the file meta information")
            length = struct.unpack_from("<I", buf, pos + 8)[0]
            pos += 12
        else:
            length = struct.unpack_from("<H", buf, pos + 6)[0]
            pos += 8
        if length == _UNDEFINED:
            raise _Unknown
        if length > size - pos:
            raise _Truncated("the file ends inside the file meta information")
        if element == 0x0002:
            sop_class = _text(buf[pos : pos + min(length, 64)])
        elif element == 0x0010:
            ts = _text(buf[pos : pos + length])
        pos += length
        if pos == size:
            raise _Truncated("the file ends after the file meta information, before any data")


def _check_deflated(data: memoryview) -> None:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    step = 1 << 20
    for start in range(0, len(data), step):
        chunk = bytes(data[start : start + step])
        while chunk and not inflater.eof:
            inflater.decompress(chunk, step)  # output is not needed, only where it ends
            chunk = inflater.unconsumed_tail
        if inflater.eof:
            return
    raise _Truncated("the deflated data stream ends before its end marker")


def _walk(
    buf: memoryview,
    pos: int,
    end: int,
    *,
    explicit: bool,
    little: bool,
    depth: int,
    in_item: bool,
    tags: dict[int, tuple[int, int]] | None = None,
) -> int:
    """Skip the elements of a dataset; returns the position after it (after the item
    delimiter when ``in_item``). ``tags`` collects the tags seen at this level, each with
    the position and length of its value."""
    order = "<" if little else ">"
    while pos < end:
        if end - pos < 8:
            raise _Truncated(f"the file ends inside an element header at byte {pos}")
        group, element = struct.unpack_from(order + "HH", buf, pos)
        tag = group << 16 | element
        if tag == _ITEM_END:
            if not in_item:
                raise _Unknown
            return pos + 8
        if group == 0xFFFE:
            raise _Unknown
        vr = b""
        if explicit:
            vr = bytes(buf[pos + 4 : pos + 6])
            if vr in _LONG_VRS:
                if end - pos < 12:
                    raise _Truncated(f"the file ends inside an element header at byte {pos}")
                length = struct.unpack_from(order + "I", buf, pos + 8)[0]
                pos += 12
            elif vr.isalpha() and vr.isupper():
                length = struct.unpack_from(order + "H", buf, pos + 6)[0]
                pos += 8
            else:
                raise _Unknown
        else:
            length = struct.unpack_from(order + "I", buf, pos + 4)[0]
            pos += 8
        if tags is not None:
            tags[tag] = (pos, length)
        if length == _UNDEFINED:
            # A sequence or encapsulated pixel data; UN of undefined length is implicit VR.
            pos = _items(
                buf, pos, end, explicit=explicit and vr != b"UN", little=little, depth=depth + 1
            )
        elif length > end - pos:
            raise _Truncated(
                f"element ({group:04X},{element:04X}) needs {length} bytes "
                f"but the file ends {end - pos} bytes later"
            )
        else:
            pos += length
    if in_item:
        raise _Truncated("the file ends inside a sequence item")
    return pos


def _items(buf: memoryview, pos: int, end: int, *, explicit: bool, little: bool, depth: int) -> int:
    if depth > _MAX_DEPTH:
        raise _Unknown
    order = "<" if little else ">"
    while True:
        if end - pos < 8:
            raise _Truncated("the file ends inside a sequence that was never closed")
        group, element, length = struct.unpack_from(order + "HHI", buf, pos)
        tag = group << 16 | element
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unknown
        if length == _UNDEFINED:
            pos = _walk(buf, pos, end, explicit=explicit, little=little, depth=depth, in_item=True)
        elif length > end - pos:
            raise _Truncated(
                f"a sequence item needs {length} bytes but the file ends {end - pos} bytes later"
            )
        else:
            pos += length
