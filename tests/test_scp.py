"""The C-STORE SCP over real associations on 127.0.0.1: every transfer syntax stored exactly as
received, malformed input stored or quarantined with a failure status, the calling AE allow-list,
``dicomnode echo``, the per-association log line, several serving processes, a full CT series.

Senders are DCMTK ``storescu``/``echoscu`` and, for bytes storescu would refuse to send, a
pynetdicom SCU that sends a file's dataset bytes verbatim (chunked from the file).
"""

from __future__ import annotations

import copy
import json
import re
import socket
import sqlite3
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, _config

from dicomnode.cli import EXIT
from tests.conftest import RunningNode, node_config, require_tool, storescu, wait_for
from tests.dicomgen import CT_IMAGE_STORAGE, encoded, make_series, write_series

_VERIFICATION = "1.2.840.10008.1.1"
_FAILURE_STATUSES = {0xA700, 0xA900, 0xC210, 0x0110}

# --- helpers ---------------------------------------------------------------------------------


def _split(path: Path) -> tuple[str, bytes]:
    """(transfer syntax, dataset bytes after the file meta) of a Part 10 file."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not a Part 10 file"
    (group_length,) = struct.unpack_from("<I", data, 140)
    start = 144 + group_length
    ts = str(read_file_meta_info(path).TransferSyntaxUID)
    return ts, data[start:]


def _other_content(path: Path, first: Path) -> bool:
    """Two files with one SOP Instance UID hold other data sets in the same transfer syntax."""
    (ts, body), (first_ts, first_body) = _split(path), _split(first)
    return ts == first_ts and _inflated(ts, body) != _inflated(first_ts, first_body)


def _inflated(ts: str, body: bytes) -> bytes:
    return zlib.decompress(body, -zlib.MAX_WBITS) if ts == DeflatedExplicitVRLittleEndian else body


def _fresh_copy(name: str, folder: Path) -> Path:
    """A bundled pydicom test file with new Study/Series/SOP Instance UIDs (so files that are
    the same instance in another encoding are not duplicates), in its own transfer syntax."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path)
    assert str(read_file_meta_info(path).TransferSyntaxUID) == str(ds.file_meta.TransferSyntaxUID)
    return path


def _raw_file(path: Path, sop_class: str, sop_uid: str, body: bytes, ts: str) -> Path:
    """A Part 10 file whose dataset is ``body`` verbatim (whatever it contains)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1475.99"
    fp = DicomBytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    path.write_bytes(fp.getvalue() + body)
    return path


def _send_raw(
    port: int,
    files: list[Path],
    *,
    calling_ae: str = "RAWSCU",
    monkeypatch: pytest.MonkeyPatch,
) -> list[int]:
    """Send each file's dataset bytes unchanged (chunked from the file) over one association;
    returns the C-STORE status of each."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    contexts = set()
    for f in files:
        meta = read_file_meta_info(f)
        contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    for sop_class, ts in sorted(contexts):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established, "association with the node failed"
    statuses = []
    try:
        for f in files:
            status = assoc.send_c_store(f)
            assert "Status" in status, f"no C-STORE response for {f.name}"
            statuses.append(int(status.Status))
    finally:
        assoc.release()
    return statuses


def _echo(port: int, calling_ae: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    exe = require_tool("echoscu")
    return subprocess.run(
        [exe, "-v", "-aet", calling_ae, "-aec", "DICOMNODE", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _assert_alive(node: RunningNode) -> None:
    assert node.proc is not None and node.proc.poll() is None, f"node died:\n{node.log()}"
    result = _echo(node.port)
    assert result.returncode == 0, f"C-ECHO failed after the test:\n{result.stderr}"


def _instance_rows(node: RunningNode, sop_uid: str) -> list[sqlite3.Row]:
    db = sqlite3.connect(f"file:{node.data / 'index.db'}?mode=ro", uri=True, timeout=30)
    db.row_factory = sqlite3.Row
    try:
        return db.execute(
            "SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_uid,)
        ).fetchall()
    finally:
        db.close()


def _stored(node: RunningNode, sop_uid: str) -> Path:
    rows = _instance_rows(node, sop_uid)
    assert len(rows) == 1, f"{sop_uid} is indexed {len(rows)} times"
    path = node.data / "storage" / rows[0]["path"]
    assert path.is_file()
    return path


def _quarantined_for(node: RunningNode, sop_uid: str) -> list[dict[str, Any]]:
    """The reason records of quarantined copies of the instance sent as ``sop_uid``."""
    found = []
    for reason in sorted((node.data / "storage" / "quarantine").rglob("*.reason.json")):
        record = yaml.safe_load(reason.read_text())
        data = reason.with_name(record["file"])
        assert data.is_file(), f"reason file {reason} without its data"
        meta = read_file_meta_info(data)
        if str(meta.get("MediaStorageSOPInstanceUID", "")) == sop_uid:
            found.append(record)
    return found


def _same_elements(sent: Dataset, kept: Dataset, where: str = "") -> None:
    """Every element of ``sent`` is in ``kept`` with the same value (PixelData byte for byte);
    the dataset trailing padding a sender may drop is ignored."""
    skip = {0xFFFCFFFC}
    sent_tags = {int(e.tag) for e in sent} - skip
    kept_tags = {int(e.tag) for e in kept} - skip
    assert sent_tags == kept_tags, f"{where}: tags differ: {sent_tags ^ kept_tags}"
    for tag in sorted(sent_tags):
        a, b = sent[tag], kept[tag]
        label = f"{where}{a.tag}"
        if a.VR == "SQ":
            assert len(a.value) == len(b.value), label
            for i, (x, y) in enumerate(zip(a.value, b.value, strict=True)):
                _same_elements(x, y, f"{label}[{i}]")
        else:
            assert a.value == b.value, f"{label} differs"


# --- every transfer syntax, stored as received ------------------------------------------------

# (id, bundled pydicom file, storescu flag that proposes exactly the file's transfer syntax)
_SYNTAXES = [
    ("implicit-le", "MR_small_implicit.dcm", "-xi"),
    ("explicit-le", "CT_small.dcm", "-xe"),
    ("explicit-be", "MR_small_bigendian.dcm", "-xb"),
    ("deflate", "image_dfl.dcm", "-xd"),
    ("jpeg-baseline", "SC_rgb_jpeg_dcmtk.dcm", "-xy"),
    ("jpeg-extended-12bit", "JPEG-lossy.dcm", "-xx"),
    ("jpeg-lossless-sv1", "SC_rgb_jpeg_gdcm.dcm", "-xs"),
    ("jpeg-ls-lossless", "MR_small_jpeg_ls_lossless.dcm", "-xt"),
    ("jpeg-ls-near-lossless", "JPEGLSNearLossless_08.dcm", "-xu"),
    ("j2k-lossless", "MR_small_jp2klossless.dcm", "-xv"),
    ("j2k-lossy", "JPEG2000.dcm", "-xw"),
    ("rle", "MR_small_RLE.dcm", "-xr"),
]


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """One node for the tests that only look at their own instances."""
    data = tmp_path_factory.mktemp("scp-node")
    config = node_config(data)
    config_path = data / "dicomnode.yaml"
    config_path.write_text(yaml.safe_dump(config))
    node = RunningNode(config_path, data, data / "node.log", config).start()
    yield node
    node.stop()


@pytest.mark.parametrize(
    ("name", "flag"), [c[1:] for c in _SYNTAXES], ids=[c[0] for c in _SYNTAXES]
)
def test_transfer_syntax_is_stored_as_received(
    shared_node: RunningNode,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    flag: str,
) -> None:
    node = shared_node
    by_storescu = _fresh_copy(name, tmp_path / "storescu")
    verbatim = _fresh_copy(name, tmp_path / "raw")
    ts, _ = _split(by_storescu)

    # DCMTK storescu proposes the file's syntax first and must not convert it.
    result = storescu(node.port, [by_storescu], extra=["-R", flag])
    assert "Received Store Response (Success)" in result.stdout + result.stderr

    sent = pydicom.dcmread(by_storescu)
    path = _stored(node, sent.SOPInstanceUID)
    stored_ts, stored_body = _split(path)
    assert stored_ts == ts
    assert _instance_rows(node, sent.SOPInstanceUID)[0]["transfer_syntax_uid"] == ts
    kept = pydicom.dcmread(path)
    assert kept.file_meta.TransferSyntaxUID == ts
    assert kept.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
    assert kept.file_meta.SourceApplicationEntityTitle == "STORESCU"
    # Compressed fragments untouched: no transcoding anywhere on the way.
    assert kept.PixelData == sent.PixelData
    _same_elements(sent, kept)

    # The bytes the node received are the bytes it kept: send the file's dataset verbatim.
    assert _send_raw(node.port, [verbatim], monkeypatch=monkeypatch) == [0x0000]
    raw = pydicom.dcmread(verbatim)
    raw_ts, raw_body = _split(_stored(node, raw.SOPInstanceUID))
    sent_ts, sent_body = _split(verbatim)
    assert raw_ts == sent_ts == ts
    assert raw_body == sent_body
    assert _inflated(ts, stored_body)  # a deflated dataset stays a valid deflate stream

    studies = {s["study_instance_uid"]: s for s in node.studies()}
    for ds in (sent, raw):
        study = studies[ds.StudyInstanceUID]
        assert study["instances"] == 1
        assert study["patient_id"] == (str(ds.get("PatientID", "")) or None)
        [series] = study["series"]
        assert series["series_instance_uid"] == ds.SeriesInstanceUID
        assert series["modality"] == (str(ds.get("Modality", "")) or None)
        assert series["sop_class_uid"] == ds.SOPClassUID
        assert series["instances"] == 1


def test_every_bundled_pydicom_file_is_stored_verbatim_or_quarantined(
    make_node: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All of pydicom's own test files that carry file meta (every transfer syntax, odd
    character sets, sequences, private tags, big endian, broken ones), their data sets sent
    byte for byte: each is answered, and is then either kept exactly as sent, a duplicate of
    an earlier file with the same SOP Instance UID, or in quarantine with a reason."""
    node = make_node()
    files = []
    for name in sorted(get_testdata_files()):
        path = Path(name)
        try:
            meta = read_file_meta_info(path)
        except Exception:
            continue  # no file meta: nothing tells a sender how to send it
        if not all(meta.get(k) for k in ("MediaStorageSOPClassUID", "TransferSyntaxUID")):
            continue
        if meta.MediaStorageSOPClassUID == "1.2.840.10008.1.3.10":
            continue  # a DICOMDIR is a file-set's index, never sent by C-STORE
        files.append(path)
    assert len(files) > 100
    statuses: dict[Path, int] = {}
    for start in range(0, len(files), 40):  # at most 128 presentation contexts each
        part = files[start : start + 40]
        statuses.update(zip(part, _send_raw(node.port, part, monkeypatch=monkeypatch), strict=True))
    _assert_alive(node)

    first_by_uid: dict[str, Path] = {}
    kept = quarantined = duplicates = conflicts = 0
    for path, status in statuses.items():
        uid = str(read_file_meta_info(path).get("MediaStorageSOPInstanceUID", ""))
        if status == 0x0000 and uid in first_by_uid and _other_content(path, first_by_uid[uid]):
            # The same SOP Instance UID with another data set in the same transfer syntax:
            # answered with success, the copy in quarantine with a reason (pydicom ships
            # several such variants).
            records = _quarantined_for(node, uid)
            assert any("stored already with other content" in r["reason"] for r in records)
            conflicts += 1
        elif status != 0x0000:
            assert status in (0xC210, 0xA900), f"{path.name}: status 0x{status:04X}"
            records = _quarantined_for(node, uid)
            assert records and all(r["reason"] for r in records), f"{path.name} not quarantined"
            quarantined += 1
        elif uid in first_by_uid:
            duplicates += 1
        else:
            first_by_uid[uid] = path
            kept_ts, kept_body = _split(_stored(node, uid))
            sent_ts, sent_body = _split(path)
            assert (kept_ts, kept_body) == (sent_ts, sent_body), path.name
            kept += 1
    assert kept > 80 and quarantined >= 1 and conflicts >= 1
    indexed = sum(study["instances"] for study in node.studies())
    assert indexed == kept
    assert sum(study["duplicates"] for study in node.studies()) == duplicates


# --- malformed input over the network -----------------------------------------------------------

_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_PRIVATE_SOP_CLASS = "1.3.6.1.4.1.9590.100.1.2.424242"  # not a storage class pynetdicom knows


def _dataset(charset: str = "ISO_IR 100", name: str = "Doe^Jane", **values: Any) -> Dataset:
    """A small secondary capture dataset with fresh UIDs; ``values`` override or (None) remove
    attributes."""
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = _SECONDARY_CAPTURE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "MALFORMED01"
    ds.PatientName = name
    ds.Modality = "OT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def _nested_sequences(levels: int) -> bytes:
    """(0008,1115) sequences nested ``levels`` deep, undefined lengths, explicit VR LE."""
    open_ = struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
    open_ += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return open_ * levels + close * levels


def _split_at(ds: Dataset, tag: int) -> tuple[Dataset, Dataset]:
    before, after = Dataset(), Dataset()
    for elem in ds:
        (before if int(elem.tag) < tag else after).add(elem)
    return before, after


def _ct_body() -> tuple[Dataset, bytes]:
    [ds] = make_series(1, modality="CT", patient_id="MALFORMED01")
    return ds, encoded(ds)


# Each case: (sop class, sop uid in the request, dataset bytes, transfer syntax, expectation).
# expectation: ("stored", patient name in the index) or ("quarantined", status, reason words).
def _case(kind: str) -> tuple[str, str, bytes, str, tuple[Any, ...]]:
    explicit = ExplicitVRLittleEndian
    if kind.startswith("missing-"):
        keyword = {
            "missing-study-uid": "StudyInstanceUID",
            "missing-series-uid": "SeriesInstanceUID",
            "missing-sop-instance-uid": "SOPInstanceUID",
        }[kind]
        sop_uid = generate_uid()
        ds = _dataset(**{keyword: None})
        return _SECONDARY_CAPTURE, sop_uid, encoded(ds), explicit, ("quarantined", 0xC210, keyword)
    if kind == "sop-uid-differs-from-request":
        ds = _dataset()
        expect = ("quarantined", 0xA900, "differs")
        return _SECONDARY_CAPTURE, generate_uid(), encoded(ds), explicit, expect
    if kind == "sop-class-differs-from-request":
        ds = _dataset()
        expect = ("quarantined", 0xA900, "SOP Class UID in the dataset")
        return CT_IMAGE_STORAGE, ds.SOPInstanceUID, encoded(ds), explicit, expect
    if kind == "truncated-in-header":
        ds, body = _ct_body()
        cut = body.index(struct.pack("<HH", 0x0020, 0x000D)) + 12  # inside the Study UID
        expect = ("quarantined", 0xC210, "")
        return CT_IMAGE_STORAGE, ds.SOPInstanceUID, body[:cut], explicit, expect
    if kind == "truncated-in-pixel-data":
        ds, body = _ct_body()
        expect = ("quarantined", 0xC210, "")
        return CT_IMAGE_STORAGE, ds.SOPInstanceUID, body[:-1000], explicit, expect
    if kind == "random-bytes":
        body = np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        expect = ("quarantined", 0xC210, "")
        return _SECONDARY_CAPTURE, generate_uid(), body, explicit, expect
    if kind == "empty-dataset":
        return _SECONDARY_CAPTURE, generate_uid(), b"", explicit, ("quarantined", 0xC210, "")
    if kind == "private-sop-class":
        ds = _dataset(SOPClassUID=_PRIVATE_SOP_CLASS)
        return (
            _PRIVATE_SOP_CLASS,
            ds.SOPInstanceUID,
            encoded(ds),
            explicit,
            ("stored", "Doe^Jane", ds.StudyInstanceUID),
        )
    if kind == "implicit-vr-private-sop-class":
        ds = _dataset(SOPClassUID=_PRIVATE_SOP_CLASS)
        body = encoded(ds, ImplicitVRLittleEndian)
        expect = ("stored", "Doe^Jane", ds.StudyInstanceUID)
        return _PRIVATE_SOP_CLASS, ds.SOPInstanceUID, body, ImplicitVRLittleEndian, expect
    if kind.startswith("sequences-nested-"):
        # In front of the Study/Series UIDs, so the header cannot be read without crossing it.
        levels = int(kind.split("-")[2])
        ds = _dataset(name="Deep^Nest")
        before, after = _split_at(ds, 0x00081115)
        body = encoded(before) + _nested_sequences(levels) + encoded(after)
        expect: tuple[Any, ...] = ("stored", "Deep^Nest", ds.StudyInstanceUID)
        if levels > 500:  # beyond any real object: refused with a reason, never a crash
            expect = ("quarantined", 0xC210, "nested")
        return _SECONDARY_CAPTURE, ds.SOPInstanceUID, body, explicit, expect
    if kind == "charset-iso2022-ir87":
        name = "Yamada^Tarou=山田^太郎=やまだ^たろう"
        ds = _dataset(charset="\\ISO 2022 IR 87", name=name)
        return (
            _SECONDARY_CAPTURE,
            ds.SOPInstanceUID,
            encoded(ds),
            explicit,
            ("stored", name, ds.StudyInstanceUID),
        )
    if kind == "charset-latin2":
        ds = _dataset(charset="ISO_IR 101", name="Dvořák^Antonín")
        expect = ("stored", "Dvořák^Antonín", ds.StudyInstanceUID)
        return _SECONDARY_CAPTURE, ds.SOPInstanceUID, encoded(ds), explicit, expect
    if kind == "charset-utf8":
        name = "Wang^XiaoDong=王^小東"
        ds = _dataset(charset="ISO_IR 192", name=name)
        return (
            _SECONDARY_CAPTURE,
            ds.SOPInstanceUID,
            encoded(ds),
            explicit,
            ("stored", name, ds.StudyInstanceUID),
        )
    if kind == "charset-unknown-name":
        # Encoded as Latin-1, then the character set renamed to one that does not exist: the
        # instance is kept and the name read with the default repertoire.
        ds = _dataset(charset="ISO_IR 100", name="Müller^Jürgen")
        body = encoded(ds).replace(b"ISO_IR 100", b"ISO_IR 999")
        expect = ("stored", "Müller^Jürgen", ds.StudyInstanceUID)
        return _SECONDARY_CAPTURE, ds.SOPInstanceUID, body, explicit, expect
    raise AssertionError(kind)


_MALFORMED = [
    "missing-study-uid",
    "missing-series-uid",
    "missing-sop-instance-uid",
    "sop-uid-differs-from-request",
    "sop-class-differs-from-request",
    "truncated-in-header",
    "truncated-in-pixel-data",
    "random-bytes",
    "empty-dataset",
    "private-sop-class",
    "implicit-vr-private-sop-class",
    "sequences-nested-100-deep",
    "sequences-nested-2000-deep",
    "charset-iso2022-ir87",
    "charset-latin2",
    "charset-utf8",
    "charset-unknown-name",
]


@pytest.mark.parametrize("kind", _MALFORMED)
def test_malformed_input_is_stored_or_quarantined(
    shared_node: RunningNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    node = shared_node
    sop_class, sop_uid, body, ts, expect = _case(kind)
    sent = _raw_file(tmp_path / "sent.dcm", sop_class, sop_uid, body, ts)
    [status] = _send_raw(node.port, [sent], monkeypatch=monkeypatch)

    if expect[0] == "stored":
        assert status == 0x0000, f"status 0x{status:04X}; log:\n{node.log()[-3000:]}"
        assert not _quarantined_for(node, sop_uid)
        _, stored_body = _split(_stored(node, sop_uid))
        assert stored_body == body
        [study] = [s for s in node.studies() if s["study_instance_uid"] == expect[2]]
        assert study["patient_id"] == "MALFORMED01"
        assert study["patient_name"] == expect[1]
        assert study["instances"] == 1
        assert study["series"][0]["sop_class_uid"] == sop_class
    else:
        _, expected_status, reason_words = expect
        assert status == expected_status, f"status 0x{status:04X}, expected 0x{expected_status:04X}"
        assert status in _FAILURE_STATUSES
        assert not _instance_rows(node, sop_uid), "a rejected instance was indexed"
        [record] = _quarantined_for(node, sop_uid)
        assert record["reason"], "quarantined without a reason"
        assert reason_words in record["reason"]
        assert record["calling_ae"] == "RAWSCU"
        # The index names the input: the request's SOP Instance UID, the sender and address.
        [row] = [q for q in _quarantine_json(node) if q["sop_instance_uid"] == sop_uid]
        assert (row["calling_ae"], row["peer_address"]) == ("RAWSCU", "127.0.0.1")
        assert row["original_name"] is None
        assert row["reason"] == record["reason"]
        assert row["path"].endswith(record["file"])
        listed = node.cli("quarantine").stdout
        assert f"  SOP Instance {sop_uid} from RAWSCU@127.0.0.1: {record['reason']}\n" in listed
    _assert_alive(node)


def _quarantine_json(node: RunningNode) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(node.cli("quarantine", "--json").stdout)
    return rows


def test_resent_instances_duplicates_conflicts_and_another_patient(
    make_node: Any, tmp_path: Path
) -> None:
    """Over storescu: the same files again are duplicates; the same SOP Instance UID with a
    changed value is answered with success but its copy is quarantined with the reason (the
    first copy stays); an instance of the study naming another patient is refused (0xC230)
    and quarantined. The called AE title the sender asked for is what the index records."""
    node = make_node()
    datasets = make_series(3, patient_id="RESEND01")
    files = write_series(tmp_path / "first", datasets)
    storescu(node.port, files, called_ae="NODE-ALIAS")
    storescu(node.port, files)
    changed = copy.deepcopy(datasets[0])
    changed.SeriesDescription = "corrected"
    other_patient = copy.deepcopy(datasets[1])
    other_patient.SOPInstanceUID = generate_uid()
    other_patient.PatientID = "SOMEONE-ELSE"
    [changed_file] = write_series(tmp_path / "changed", [changed])
    [other_file] = write_series(tmp_path / "other", [other_patient])
    result = storescu(node.port, [changed_file])
    assert "Received Store Response (Success)" in result.stdout + result.stderr
    result = storescu(node.port, [other_file], check=False)
    assert "Received Store Response (Error: CannotUnderstand)" in result.stdout + result.stderr

    [study] = node.studies()
    assert (study["instances"], study["duplicates"], study["patient_id"]) == (3, 3, "RESEND01")
    [series] = study["series"]
    assert series["source"]["called_ae"] == "NODE-ALIAS"
    kept = {pydicom.dcmread(p).SOPInstanceUID: p for p in node.storage_files()}
    assert len(kept) == 3
    assert pydicom.dcmread(kept[changed.SOPInstanceUID]).SeriesDescription == (
        datasets[0].SeriesDescription
    )
    [conflict] = _quarantined_for(node, changed.SOPInstanceUID)
    assert "stored already with other content" in conflict["reason"]
    assert "SeriesDescription" in conflict["reason"]
    [refused] = _quarantined_for(node, other_patient.SOPInstanceUID)
    assert "belongs to another patient" in refused["reason"]
    lines = wait_for(
        lambda: [m for m in _LOG_LINE.finditer(node.log())], what="association log lines"
    )
    assert "1 conflicting" in node.log()
    assert any(m["called"] == "NODE-ALIAS" for m in lines)


def test_quarantine_names_the_instance_storescu_sent(
    shared_node: RunningNode, tmp_path: Path
) -> None:
    node = shared_node
    [ds] = make_series(1, modality="CT")
    del ds.SeriesInstanceUID  # cannot be indexed: quarantined, failure status
    [sent] = write_series(tmp_path / "noseries", [ds])
    result = storescu(node.port, [sent], calling_ae="QSENDER", check=False)
    assert "Received Store Response (Error: CannotUnderstand)" in result.stdout + result.stderr
    [row] = [q for q in _quarantine_json(node) if q["sop_instance_uid"] == ds.SOPInstanceUID]
    assert row["calling_ae"] == "QSENDER" and row["peer_address"] == "127.0.0.1"
    assert row["original_name"] is None
    assert "SeriesInstanceUID" in row["reason"] or "Series Instance UID" in row["reason"]
    assert Path(row["path"]).is_file()
    assert row["size_bytes"] == Path(row["path"]).stat().st_size
    assert set(row) == {
        "id",
        "received_at",
        "reason",
        "source",
        "original_name",
        "sop_instance_uid",
        "calling_ae",
        "peer_address",
        "path",
        "size_bytes",
    }
    text = node.cli("quarantine").stdout
    assert f"  SOP Instance {ds.SOPInstanceUID} from QSENDER@127.0.0.1: {row['reason']}\n" in text
    assert f"\n    {row['path']}\n" in text


# --- allow-list and echo ----------------------------------------------------------------------


def test_allow_list_admits_listed_callers_and_refuses_others(
    make_node: Any, ct_files: list[Path]
) -> None:
    node = make_node(
        node={
            "allowed_calling_aes": [
                "ANYWHERE",
                {"ae_title": "LOCAL", "host": "127.0.0.1"},
                {"ae_title": "REMOTE", "host": "192.0.2.0/24"},
            ]
        }
    )
    for ae in ("ANYWHERE", "LOCAL"):
        result = _echo(node.port, ae)
        assert result.returncode == 0, result.stderr
    storescu(node.port, ct_files[:2], calling_ae="LOCAL")

    for ae in ("INTRUDER", "REMOTE"):  # unknown title; known title from the wrong address
        result = _echo(node.port, ae)
        assert result.returncode != 0
        assert "Association Rejected" in result.stdout + result.stderr
        sent = storescu(node.port, ct_files[2:4], calling_ae=ae, check=False)
        assert sent.returncode != 0
        assert "Association Rejected" in sent.stdout + sent.stderr
        wait_for(
            lambda ae=ae: f"association refused: calling AE '{ae}' from 127.0.0.1" in node.log(),
            what=f"the refusal of {ae} in the log",
        )
    # The CLI's own echo calls as the node's AE title, which is not listed either: refused,
    # with the reason from the A-ASSOCIATE-RJ and its own exit code.
    refused = node.cli("echo", f"127.0.0.1:{node.port}", check=False)
    assert refused.returncode == EXIT["rejected"] == 5, refused.stderr
    assert (
        f"C-ECHO as DICOMNODE: ANY-SCP@127.0.0.1:{node.port} refused the association: "
        "Calling AE title not recognised (Rejected Permanent, from the Service User); "
        "it does not accept our calling AE title DICOMNODE"
    ) in refused.stderr
    assert "--calling-ae TITLE" in refused.stderr
    as_listed = node.cli("echo", f"127.0.0.1:{node.port}", "--calling-ae", "LOCAL", check=False)
    assert as_listed.returncode == EXIT["ok"], as_listed.stderr
    assert "success" in as_listed.stdout

    [study] = node.studies()
    assert study["instances"] == 2
    assert {s["source"]["calling_ae"] for s in study["series"]} == {"LOCAL"}
    assert len(node.storage_files()) == 2
    _assert_alive_as(node, "ANYWHERE")


def test_a_listener_open_to_anyone_is_warned_about(tmp_path: Path) -> None:
    """The embedded default (``make run``) listens on all interfaces and admits any calling AE
    so that senders on other hosts reach it; it says so with one warning at start."""
    from dicomnode.service import open_to_any_caller
    from dicomnode.settings import NodeSettings, embedded_settings

    warning = open_to_any_caller(embedded_settings(tmp_path / "data").node)
    assert warning == (
        "accepting associations from any calling AE on all interfaces; "
        "set node.allowed_calling_aes to restrict"
    )
    assert "on all interfaces" in (open_to_any_caller(NodeSettings(host="::")) or "")
    assert "on 192.0.2.5;" in (open_to_any_caller(NodeSettings(host="192.0.2.5")) or "")
    assert "on pacs-gw.example.org;" in (
        open_to_any_caller(NodeSettings(host="pacs-gw.example.org")) or ""
    )
    for quiet in (
        NodeSettings.model_validate({"host": "0.0.0.0", "allowed_calling_aes": ["PACS"]}),
        NodeSettings(host="127.0.0.1"),
        NodeSettings(host="127.0.1.1"),
        NodeSettings(host="::1"),
        NodeSettings(host="localhost"),
    ):
        assert open_to_any_caller(quiet) is None, quiet


def _assert_alive_as(node: RunningNode, calling_ae: str) -> None:
    assert node.proc is not None and node.proc.poll() is None, f"node died:\n{node.log()}"
    assert _echo(node.port, calling_ae).returncode == 0


def test_echo_command_by_address_and_by_registered_name(make_node: Any) -> None:
    node = make_node()
    by_address = node.cli("echo", f"127.0.0.1:{node.port}", "--ae", "DICOMNODE", check=False)
    assert by_address.returncode == 0, by_address.stderr
    assert "success" in by_address.stdout

    # Register the running node under a name (the running node does not re-read its config).
    config = {
        **node.config,
        "nodes": {"SELF": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": node.port}},
    }
    node.config_path.write_text(yaml.safe_dump(config))
    by_name = node.cli("echo", "SELF", check=False)
    assert by_name.returncode == 0, by_name.stderr
    assert f"DICOMNODE@127.0.0.1:{node.port}: success" in by_name.stdout

    unknown = node.cli("echo", "NOSUCHNODE", check=False)
    assert unknown.returncode == 2
    assert "SELF" in unknown.stderr  # names what is registered

    # A port where nobody listens (bound, never listening: refused at once).
    with socket.socket() as idle:
        idle.bind(("127.0.0.1", 0))
        port = idle.getsockname()[1]
        closed = node.cli("echo", f"127.0.0.1:{port}", "--timeout", "5", check=False)
    assert closed.returncode == EXIT["unreachable"] == 4
    assert (
        f"unreachable: ANY-SCP@127.0.0.1:{port}: connection refused: nothing listens on port "
        f"{port} of 127.0.0.1"
    ) in closed.stderr
    assert "association DICOMNODE from 127.0.0.1" in node.log()
    # Listening, but not a DICOM node: the connection is accepted, the request not answered.
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        port = mute.getsockname()[1]
        silent = node.cli("echo", f"127.0.0.1:{port}", "--timeout", "1", check=False)
    assert silent.returncode == EXIT["unreachable"]
    assert "accepted the connection but not the association request" in silent.stderr
    assert "no answer within 1 s" in silent.stderr
    # A listener whose queue of pending connections is full: new connections time out.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        waiting = [socket.socket() for _ in range(4)]
        try:
            for pending in waiting:
                pending.setblocking(False)
                pending.connect_ex(("127.0.0.1", port))
            late = node.cli("echo", f"127.0.0.1:{port}", "--timeout", "1", check=False)
        finally:
            for pending in waiting:
                pending.close()
    assert late.returncode == EXIT["unreachable"]
    assert f"connection timed out: no answer from 127.0.0.1:{port} within 1 s" in late.stderr

    bad_title = node.cli("echo", "SELF", "--calling-ae", "A_TITLE_TOO_LONG_", check=False)
    assert bad_title.returncode == EXIT["usage"]
    assert "--calling-ae 'A_TITLE_TOO_LONG_'" in bad_title.stderr
    # Loopback only: nobody else can connect, so no warning about admitting any caller.
    assert "accepting associations from any calling AE" not in node.log()


# --- the association log line -------------------------------------------------------------------

_LOG_LINE = re.compile(
    r"association (?P<calling>\S+) from (?P<peer>[\d.]+):(?P<port>\d+) to (?P<called>\S+): "
    r"(?P<stored>\d+) stored, (?P<duplicates>\d+) duplicate, \d+ conflicting, "
    r"(?P<failed>\d+) failed, "
    r"(?P<bytes>\d+) bytes, (?P<seconds>[\d.]+) s, (?P<outcome>[\w ]+)$",
    re.MULTILINE,
)


def test_one_log_line_per_association_without_patient_identifiers(
    make_node: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DEBUG: the most talkative level must still keep patient identifiers out.
    node = make_node(logging={"level": "DEBUG", "patient_identifiers": False})
    pid, first, last = "SECRETPID4711", "Hildegard", "Geheimnis"
    files = write_series(
        tmp_path / "ct", make_series(3, patient_id=pid, patient_name=f"{last}^{first}")
    )
    storescu(node.port, files, calling_ae="LOGSTORE")
    storescu(node.port, files[:1], calling_ae="LOGDUP")
    storescu(node.port, files[1:2], calling_ae="LOGABORT", extra=["--abort"])
    bad = _dataset(name=f"{last}^{first}", PatientID=pid, StudyInstanceUID=None)
    sent = _raw_file(
        tmp_path / "bad.dcm",
        _SECONDARY_CAPTURE,
        bad.SOPInstanceUID,
        encoded(bad),
        ExplicitVRLittleEndian,
    )
    assert _send_raw(node.port, [sent], calling_ae="LOGBAD", monkeypatch=monkeypatch) == [0xC210]

    def lines() -> dict[str, list[dict[str, str]]]:
        out: dict[str, list[dict[str, str]]] = {}
        for m in _LOG_LINE.finditer(node.log()):
            out.setdefault(m["calling"], []).append(m.groupdict())
        return out

    found = wait_for(
        lambda: (
            (got := lines()) and {"LOGSTORE", "LOGDUP", "LOGABORT", "LOGBAD"} <= set(got) and got
        ),
        what="the association log lines",
    )
    for ae in ("LOGSTORE", "LOGDUP", "LOGABORT", "LOGBAD"):
        assert len(found[ae]) == 1, f"{ae}: {found[ae]}"
    store, dup, abort, bad_line = (
        found[a][0] for a in ("LOGSTORE", "LOGDUP", "LOGABORT", "LOGBAD")
    )
    sizes = sum(p.stat().st_size for p in node.storage_files())
    assert (store["stored"], store["duplicates"], store["failed"]) == ("3", "0", "0")
    assert int(store["bytes"]) == sizes
    assert store["outcome"] == "released"
    assert store["peer"] == "127.0.0.1" and store["called"] == "DICOMNODE"
    assert 0 < float(store["seconds"]) < 60
    assert (dup["stored"], dup["duplicates"], dup["bytes"]) == ("0", "1", "0")
    assert abort["outcome"] == "aborted" and abort["duplicates"] == "1"
    assert (bad_line["stored"], bad_line["failed"]) == ("0", "1")

    log = node.log()
    for secret in (pid, first, last):
        assert secret not in log, f"patient identifier {secret!r} in the log"
    # The identifiers did arrive: they are in the index, just not in the log.
    [study] = [s for s in node.studies() if s["patient_id"] == pid]
    assert study["patient_name"] == f"{last}^{first}"


# --- several processes, association limit, a full CT ------------------------------------------


def test_several_processes_store_parallel_associations(make_node: Any, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    node = make_node(node={"processes": 2})
    batches = [
        write_series(tmp_path / f"s{i}", make_series(10, patient_id=f"PAR{i:03d}", seed=i))
        for i in range(4)
    ]
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(
                lambda b: storescu(node.port, b[1], calling_ae=f"PAR{b[0]}"), enumerate(batches)
            )
        )
    for r in results:
        assert (r.stdout + r.stderr).count("Received Store Response (Success)") == 10
    studies = {s["patient_id"]: s for s in node.studies()}
    assert sorted(studies) == [f"PAR{i:03d}" for i in range(4)]
    assert all(s["instances"] == 10 and s["series"][0]["instances"] == 10 for s in studies.values())
    assert len(node.storage_files()) == 40
    wait_for(
        lambda: (
            {m["calling"] for m in _LOG_LINE.finditer(node.log())} >= {f"PAR{i}" for i in range(4)}
        ),
        what="a log line for each association",
    )
    # The serving processes are children of the node: both log with their own pid.
    pids = set(re.findall(r"dicomnode\.scp\[(\d+)\]", node.log()))
    assert str(node.proc.pid) not in pids
    _assert_alive(node)


@pytest.mark.parametrize("processes", [1, 3])
def test_association_limit_refuses_extra_associations(make_node: Any, processes: int) -> None:
    """The limit counts the associations of all serving processes together."""
    node = make_node(node={"max_associations": 2, "processes": processes})
    holders = []
    for name in ("HOLDER1", "HOLDER2"):
        ae = AE(ae_title=name)
        ae.add_requested_context(_VERIFICATION)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert assoc.is_established
        holders.append(assoc)
    try:
        extra = _echo(node.port, "EXTRA")
        assert extra.returncode != 0
        assert "Association Rejected" in extra.stdout + extra.stderr
        assert "Local Limit Exceeded" in extra.stdout + extra.stderr
        assert "Transient" in extra.stdout + extra.stderr  # the caller may try again later
        for assoc in holders:  # the admitted ones are unaffected
            assert assoc.send_c_echo().Status == 0x0000
    finally:
        holders[0].release()
    wait_for(lambda: _echo(node.port, "AFTER").returncode == 0, what="a free association slot")
    holders[1].release()
    assert "calling AE 'EXTRA' from 127.0.0.1: 2 associations already open, " in node.log()
    assert "node.max_associations is 2" in node.log()


def test_multislice_ct_in_one_association(make_node: Any, tmp_path: Path) -> None:
    node = make_node()
    datasets = make_series(50, rows=512, columns=512, patient_id="BIGCT01")
    files = write_series(tmp_path / "ct512", datasets)
    result = storescu(node.port, files, calling_ae="BIGCT")
    output = result.stdout + result.stderr
    assert output.count("Requesting Association") == 1
    assert output.count("Received Store Response (Success)") == 50

    [study] = node.studies()
    assert study["study_instance_uid"] == datasets[0].StudyInstanceUID
    assert study["patient_id"] == "BIGCT01"
    assert study["instances"] == 50
    [series] = study["series"]
    assert (series["modality"], series["instances"]) == ("CT", 50)
    stored = {pydicom.dcmread(p).SOPInstanceUID: p for p in node.storage_files()}
    assert len(stored) == 50
    for ds in datasets:
        kept = pydicom.dcmread(stored[ds.SOPInstanceUID])
        assert kept.PixelData == ds.PixelData
        assert kept.InstanceNumber == ds.InstanceNumber
    m = wait_for(
        lambda: [x for x in _LOG_LINE.finditer(node.log()) if x["calling"] == "BIGCT"],
        what="the association log line",
    )
    assert m[0]["stored"] == "50"
    assert int(m[0]["bytes"]) == sum(p.stat().st_size for p in stored.values())
