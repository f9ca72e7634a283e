"""The fast header reader gives exactly what the pydicom path gives, or hands over to it."""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import pydicom.data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.filereader import _read_file_meta_info, read_preamble

from dicomnode import ingest
from dicomnode.headerscan import NotHandled

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"

# (tag, VR) of attributes the index reads, and some it skips.
FIELDS = {
    0x00080005: "CS",  # SpecificCharacterSet
    0x00080008: "CS",  # ImageType
    0x00080016: "UI",
    0x00080018: "UI",
    0x00080020: "DA",
    0x00080050: "SH",
    0x00080060: "CS",
    0x00080070: "LO",
    0x00080090: "PN",
    0x00081030: "LO",
    0x0008103E: "LO",
    0x00100010: "PN",
    0x00100020: "LO",
    0x00180050: "DS",
    0x0020000D: "UI",
    0x0020000E: "UI",
    0x00200011: "IS",
    0x00200013: "IS",
    0x00200037: "DS",
    0x00280010: "US",
}
REQUIRED = {0x00080016, 0x00080018, 0x0020000D, 0x0020000E}
LONG = {"OB", "OW", "SQ", "UN", "UT", "UC", "UR"}


def _element(tag: int, vr: str, value: bytes, explicit: bool) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr in ("UI", "OB") else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return head + struct.pack("<I", len(value)) + value
    if vr in LONG:
        return head + vr.encode() + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return head + vr.encode() + struct.pack("<H", len(value)) + value


def _sequence(tag: int, items: list[bytes], explicit: bool, undefined: bool) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    body = b""
    for item in items:
        if undefined:
            body += b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + item + b"\xfe\xff\x0d\xe0" + b"\0" * 4
        else:
            body += b"\xfe\xff\x00\xe0" + struct.pack("<I", len(item)) + item
    if undefined:
        length = b"\xff\xff\xff\xff"
        body += b"\xfe\xff\xdd\xe0" + b"\0" * 4
    else:
        length = struct.pack("<I", len(body))
    if explicit:
        return head + b"SQ\x00\x00" + length + body
    return head + length + body


def _pydicom_header(data: bytes, ts: str) -> ingest._Header | str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ingest._header_from(ingest._parse_dataset(data, ts), "")
        except Exception as exc:
            return f"error: {exc}"


def _fast_header(data: bytes, ts: str) -> ingest._Header | str | None:
    try:
        values = ingest._SCANNER.scan(data, ts)
    except NotHandled:
        return None
    try:
        return ingest._header_from(values, "")
    except Exception as exc:
        return f"error: {exc}"


_BYTES = st.lists(st.sampled_from(list(b"AZaz09 .\\^=-+eE\x00\xe9\xfc\x1b\t")), max_size=24).map(
    bytes
)
_NUMBER = st.one_of(
    st.integers(-(10**6), 10**6).map(lambda i: str(i).encode()),
    st.floats(-1e6, 1e6, allow_nan=False).map(lambda f: f"{f:.6g}".encode()),
    st.lists(st.floats(-10, 10).map(lambda f: f"{f:.3g}"), min_size=1, max_size=6).map(
        lambda v: "\\".join(v).encode()
    ),
    _BYTES,
)
_CHARSET = st.sampled_from(
    [None, b"ISO_IR 100", b"ISO_IR 192", b"ISO_IR 144", b"\\ISO 2022 IR 87", b"ISO_IR 6"]
)


@st.composite
def datasets(draw: st.DrawFn) -> tuple[bytes, str]:
    explicit = draw(st.booleans())
    elements: dict[int, bytes] = {}
    for tag, vr in FIELDS.items():
        if tag in REQUIRED:
            uid = draw(st.sampled_from([b"1.2.3.4", b"1.2.840.10008.5.1.4.1.1.2", b"2.25.1 "]))
            elements[tag] = _element(tag, vr, uid, explicit)
            continue
        if tag == 0x00080005:
            charset = draw(_CHARSET)
            if charset is not None:
                elements[tag] = _element(tag, vr, charset, explicit)
            continue
        if not draw(st.booleans()):
            continue
        if vr == "US":
            count = draw(st.integers(0, 2))
            value = struct.pack(f"<{count}H", *([512] * count))
        elif vr in ("DS", "IS"):
            value = draw(_NUMBER)
        else:
            value = draw(_BYTES)
        if explicit and draw(st.integers(0, 20)) == 0:
            vr = "UN"
        elements[tag] = _element(tag, vr, value, explicit)
    # Sequences the reader must skip: nested, defined and undefined lengths.
    inner = _element(0x00080100, "SH", b"CODE", explicit)
    nested = _sequence(0x00400260, [inner], explicit, draw(st.booleans()))
    items = draw(st.lists(st.sampled_from([inner, inner + nested, b""]), max_size=3))
    elements[0x00081140] = _sequence(0x00081140, items, explicit, draw(st.booleans()))
    # Past the header: never read.
    elements[0x00291010] = _element(0x00291010, "OB", b"\xff" * 7, explicit)
    elements[0x7FE00010] = _element(0x7FE00010, "OW", b"\x01\x02" * 64, explicit)
    data = b"".join(elements[t] for t in sorted(elements))
    return data, EXPLICIT if explicit else IMPLICIT


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets())
def test_fast_reader_agrees_with_pydicom(case: tuple[bytes, str]) -> None:
    data, ts = case
    fast = _fast_header(data, ts)
    if fast is not None:
        assert fast == _pydicom_header(data, ts)


def _dataset_bytes(path: str) -> tuple[bytes, str] | None:
    raw = Path(path).read_bytes()
    fp = io.BytesIO(raw)
    try:
        if read_preamble(fp, False) is None:
            return None
        meta = _read_file_meta_info(fp)
    except Exception:
        return None
    ts = meta.get("TransferSyntaxUID")
    return (raw[fp.tell() :], str(ts)) if ts else None


def test_fast_reader_agrees_on_pydicom_test_files() -> None:
    handled = 0
    # The files bundled with pydicom (get_testdata_files would try to download more).
    bundled = Path(pydicom.data.__file__).parent / "test_files"
    for path in sorted(str(p) for p in bundled.rglob("*.dcm")):
        case = _dataset_bytes(path)
        if case is None:
            continue
        fast = _fast_header(*case)
        if fast is None:
            continue
        handled += 1
        assert fast == _pydicom_header(*case), path
    assert handled > 20


def test_generated_ct_takes_the_fast_path(ct_files: list[Path]) -> None:
    case = _dataset_bytes(str(ct_files[0]))
    assert case is not None
    header = _fast_header(*case)
    assert isinstance(header, ingest._Header)
    assert header == _pydicom_header(*case)
    assert header.series["modality"] == "CT"


@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", "1.2.3.4.5.6"])
def test_other_encodings_are_left_to_pydicom(ts: str) -> None:
    with pytest.raises(NotHandled):
        ingest._SCANNER.scan(b"\x08\x00\x18\x00UI\x04\x001.2\x00", ts)


def test_long_header_beyond_the_prefix_is_read() -> None:
    # Values over 4 KB are deferred (and so not read) by the pydicom path: use several smaller.
    private = [_element(0x00091010 + i, "LO", b"x" * 4000, True) for i in range(6)]
    data = b"".join(
        [
            _element(0x00080016, "UI", b"1.2.3", True),
            _element(0x00080018, "UI", b"1.2.3.4", True),
            _element(0x00081030, "LO", b"y" * 4000, True),
            *private,
            _element(0x0020000D, "UI", b"1.2.3.5", True),
            _element(0x0020000E, "UI", b"1.2.3.6", True),
        ]
    )
    assert len(data) > 20000
    values = ingest._SCANNER.scan(memoryview(data), EXPLICIT)
    assert values["SeriesInstanceUID"] == "1.2.3.6"
    assert _fast_header(data, EXPLICIT) == _pydicom_header(data, EXPLICIT)
