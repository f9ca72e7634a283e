"""Unit tests of the storage layer (durable FileStore, UID sanitising) and of the Ingestor
against a real SQLite index in a temporary folder."""

from __future__ import annotations

import copy
import json
import os
import re
import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pydicom.config
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from dicomnode.completion import CompletionMonitor
from dicomnode.errors import QuarantinedError
from dicomnode.ingest import Ingestor, Source
from dicomnode.settings import CompletionSettings
from storage.db import make_engine, upgrade_schema, utcnow
from storage.filestore import FileStore, sanitize_uid
from storage.models import Instance, QuarantineRecord, Series, Study
from tests.dicomgen import encoded, make_series

# --- sanitize_uid ------------------------------------------------------------------------

HOSTILE = [
    "../../etc",
    "../../etc/passwd",
    "1.2.3/../x",
    "1.2.3/../../../../tmp/x",
    "/etc/passwd",
    "..",
    ".",
    "",
    "1.2.3.",
    "1..2",
    "1.2.3\n",
    "1.2.3\x00.4",
    "1.2\\..\\..\\x",
    "1" * 65,
    "1." * 5000,
    "ü1.2.3",
    "١٢٣.٤",  # Arabic-Indic digits: \d would accept them, a file system would not care
    "1.2.3 ",
    "\ud800",
    "\udcff",
    "~root",
    "$(rm -rf /)",
]


def _is_safe_name(name: str) -> bool:
    return (
        0 < len(name) <= 64
        and name not in (".", "..")
        and all(c in "0123456789._abcdef" for c in name)
    )


@pytest.mark.parametrize("uid", HOSTILE)
def test_hostile_uids_become_safe_file_names(uid: str, tmp_path: Path) -> None:
    name = sanitize_uid(uid)
    assert _is_safe_name(name), name
    assert name != uid
    store = FileStore(tmp_path)
    relative = store.relative_path(uid, uid, uid)
    target = (tmp_path / relative).resolve()
    assert target.is_relative_to((tmp_path / "studies").resolve())
    assert len(Path(relative).parts) == 4


def test_valid_uids_are_kept_as_they_are() -> None:
    for uid in ("1.2.840.10008.5.1.4.1.1.2", "2.25.1234567890123456789", "0", "1" * 64):
        assert sanitize_uid(uid) == uid


def test_different_invalid_uids_do_not_collide() -> None:
    names = [sanitize_uid(u) for u in HOSTILE]
    assert len(set(names)) == len(HOSTILE)
    # Same cleaned prefix, different input: the digest keeps them apart.
    pairs = [
        ("1.2.3/a", "1.2.3/b"),
        ("1.2.3ä", "1.2.3ö"),
        ("1" * 50 + "x", "1" * 50 + "y"),  # differ only beyond the kept prefix
        ("1.2.3.", "1.2.3_"),
        ("1.2.3\n", "1.2.3\r"),
    ]
    for a, b in pairs:
        assert sanitize_uid(a) != sanitize_uid(b), (a, b)
    # An invalid UID never takes the name of a valid one.
    assert sanitize_uid("1.2.3.") != "1.2.3"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200), st.text(max_size=200))
def test_sanitize_uid_is_safe_and_injective(a: str, b: str) -> None:
    name_a, name_b = sanitize_uid(a), sanitize_uid(b)
    assert _is_safe_name(name_a) or name_a == a
    assert "/" not in name_a and name_a not in (".", "..", "")
    if a != b:
        assert name_a != name_b


# --- FileStore ----------------------------------------------------------------------------


def test_durable_write_fsyncs_file_and_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(tmp_path / "root")
    store.prepare()
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    tmp, size = store.write_temp([b"abc", memoryview(b"defg"), b""])
    assert size == 7
    assert tmp.parent == store.tmp_dir and tmp.suffix == ".part"
    assert synced == [str(tmp)]  # the data is on disk before the rename
    final = store.commit_temp(tmp, "studies/1.2/3.4/5.6.dcm")
    assert final == tmp_path / "root" / "studies/1.2/3.4/5.6.dcm"
    assert final.read_bytes() == b"abcdefg"
    assert not tmp.exists()
    # New folders and the final folder entry are made durable too.
    assert str(final.parent) in synced[1:]
    assert str(final.parent.parent) in synced[1:]
    assert list(store.tmp_dir.iterdir()) == []


def test_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.prepare()

    def chunks() -> Iterator[bytes]:
        yield b"x" * 1000
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        store.write_temp(chunks())
    assert list(store.tmp_dir.iterdir()) == []


def test_prepare_removes_partial_writes_only(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.prepare()
    (store.tmp_dir / "dead.part").write_bytes(b"half")
    kept = tmp_path / "studies" / "1" / "2" / "3.dcm"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"whole")
    store.prepare()
    assert list(store.tmp_dir.iterdir()) == []
    assert kept.read_bytes() == b"whole"


def test_commit_replaces_an_unindexed_leftover(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.prepare()
    relative = store.relative_path("1.2", "1.2.3", "1.2.3.4")
    tmp, _ = store.write_temp([b"first"])
    store.commit_temp(tmp, relative)
    tmp, _ = store.write_temp([b"second"])
    assert store.commit_temp(tmp, relative).read_bytes() == b"second"


# --- Ingestor -----------------------------------------------------------------------------

SCU = Source(kind="dicom", calling_ae="MODALITY", called_ae="DICOMNODE", peer_address="127.0.0.1")


@pytest.fixture
def ingestor(tmp_path: Path) -> Iterator[Ingestor]:
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    upgrade_schema(engine)
    store = FileStore(tmp_path / "storage")
    store.prepare()
    yield Ingestor(engine, store)
    engine.dispose()


def send(ingestor: Ingestor, ds: Dataset, request_uid: str | None = None) -> object:
    return ingestor.ingest_network(
        encoded(ds),
        ExplicitVRLittleEndian,
        str(ds.SOPClassUID),
        request_uid or str(ds.SOPInstanceUID),
        SCU,
    )


def count(engine: Engine, model: type[object]) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(model)).scalar_one())


def quarantined(ingestor: Ingestor) -> list[tuple[Path, dict[str, object]]]:
    out = []
    for reason in sorted(ingestor.store.quarantine_dir.rglob("*.reason.json")):
        info = json.loads(reason.read_text())
        out.append((reason.parent / info["file"], info))
    return out


def test_network_instance_is_stored_with_file_meta_and_indexed(ingestor: Ingestor) -> None:
    ds = make_series(1)[0]
    result = send(ingestor, ds)
    assert not result.duplicate  # type: ignore[attr-defined]
    path = ingestor.store.absolute(result.path)  # type: ignore[attr-defined]
    kept = pydicom.dcmread(path)
    assert kept.SOPInstanceUID == ds.SOPInstanceUID
    assert kept.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert kept.file_meta.SourceApplicationEntityTitle == "MODALITY"
    assert kept.PixelData == ds.PixelData
    with Session(ingestor.engine) as session:
        inst = session.scalars(select(Instance)).one()
        study = session.scalars(select(Study)).one()
        series = session.scalars(select(Series)).one()
    assert inst.path == result.path and inst.size_bytes == path.stat().st_size  # type: ignore[attr-defined]
    assert (inst.calling_ae, inst.peer_address, inst.study_version) == ("MODALITY", "127.0.0.1", 1)
    assert (study.patient_id, study.instances, study.state) == ("PAT001", 1, "receiving")
    assert (series.modality, series.series_number, series.instances) == ("CT", 1, 1)
    assert series.attributes["Rows"] == "64"


def test_file_is_stored_byte_for_byte(ingestor: Ingestor, ct_files: list[Path]) -> None:
    source = Source(kind="folder", folder="/incoming")
    result = ingestor.ingest_file(ct_files[0], source)
    assert ingestor.store.absolute(result.path).read_bytes() == ct_files[0].read_bytes()
    with ingestor.engine.connect() as conn:
        assert conn.execute(select(Series.source_folder)).scalar_one() == "/incoming"


def test_duplicate_is_counted_not_stored_twice(ingestor: Ingestor, ct_files: list[Path]) -> None:
    series = make_series(3)
    for ds in series:
        send(ingestor, ds)
    again = send(ingestor, series[0])
    assert again.duplicate  # type: ignore[attr-defined]
    # The same instance from the folder is the same instance.
    first = pydicom.dcmread(ct_files[0])
    send(ingestor, first)
    assert ingestor.ingest_file(ct_files[0], Source(kind="folder", folder="x")).duplicate
    engine = ingestor.engine
    assert count(engine, Instance) == 4
    with engine.connect() as conn:
        dups = dict(conn.execute(select(Instance.sop_instance_uid, Instance.duplicates)).all())
        studies = conn.execute(
            select(Study.study_instance_uid, Study.instances, Study.duplicates)
        ).all()
    assert dups[series[0].SOPInstanceUID] == 1
    assert dups[first.SOPInstanceUID] == 1
    assert sorted((n, d) for _, n, d in studies) == [(1, 1), (3, 1)]
    files = list((ingestor.store.root / "studies").rglob("*.dcm"))
    assert len(files) == 4


def test_same_sop_instance_under_other_study_uids_is_a_conflict_kept_in_quarantine(
    ingestor: Ingestor,
) -> None:
    """A SOP Instance UID the index holds, sent again with other study and series UIDs: the
    first copy stays as it was, the new one goes to quarantine saying what differs, and
    nothing else is left under the studies folder."""
    original = make_series(1)[0]
    kept = send(ingestor, original)
    other = copy.deepcopy(original)
    other.StudyInstanceUID = generate_uid()
    other.SeriesInstanceUID = generate_uid()
    with pytest.raises(QuarantinedError) as info:
        send(ingestor, other)
    assert info.value.kind == "conflict"
    assert "is stored already with other content" in info.value.reason
    assert "StudyInstanceUID, SeriesInstanceUID" in info.value.reason
    files = list((ingestor.store.root / "studies").rglob("*.dcm"))
    assert files == [ingestor.store.absolute(kept.path)]  # type: ignore[attr-defined]
    assert pydicom.dcmread(files[0]).StudyInstanceUID == original.StudyInstanceUID
    assert pydicom.dcmread(info.value.path).StudyInstanceUID == other.StudyInstanceUID
    assert count(ingestor.engine, Instance) == 1
    with ingestor.engine.connect() as conn:
        assert conn.execute(select(Instance.duplicates)).scalar_one() == 0


def test_same_instance_sent_again_is_a_duplicate_in_any_transfer_syntax(
    ingestor: Ingestor,
) -> None:
    """The same data set again, and the same instance in another transfer syntax, are
    duplicates of the stored one (counted, not stored twice); the same UID with one value
    changed in the same transfer syntax is a conflict that names the attribute."""
    ds = make_series(1)[0]
    kept = send(ingestor, ds)
    assert send(ingestor, ds).duplicate  # type: ignore[attr-defined]
    implicit = ingestor.ingest_network(
        encoded(ds, ImplicitVRLittleEndian),
        ImplicitVRLittleEndian,
        ds.SOPClassUID,
        ds.SOPInstanceUID,
        Source(kind="dicom", calling_ae="MODALITY", peer_address="127.0.0.1"),
    )
    assert implicit.duplicate
    changed = copy.deepcopy(ds)
    changed.SeriesDescription = "corrected"
    with pytest.raises(QuarantinedError) as info:
        send(ingestor, changed)
    assert info.value.kind == "conflict"
    assert "differs in SeriesDescription" in info.value.reason
    assert pydicom.dcmread(ingestor.store.absolute(kept.path)).SeriesDescription == (  # type: ignore[attr-defined]
        ds.SeriesDescription
    )
    with ingestor.engine.connect() as conn:
        assert conn.execute(select(Instance.duplicates)).scalar_one() == 2


def test_instance_naming_another_patient_is_refused_from_a_study(ingestor: Ingestor) -> None:
    """One study, one patient: an instance with the study's UID but another Patient ID is
    quarantined (a known series, and a new series of the study), the study keeps its own."""
    first, second = make_series(2)
    send(ingestor, first)
    same_series = copy.deepcopy(second)
    same_series.PatientID = "SOMEONE-ELSE"
    other_series = copy.deepcopy(second)
    other_series.PatientID = "SOMEONE-ELSE"
    other_series.SeriesInstanceUID = generate_uid()
    other_series.SOPInstanceUID = generate_uid()
    for ds in (same_series, other_series):
        with pytest.raises(QuarantinedError) as info:
            send(ingestor, ds)
        assert info.value.kind == "other_patient"
        assert "belongs to another patient" in info.value.reason
        assert "'SOMEONE-ELSE'" in info.value.reason
    assert count(ingestor.engine, Instance) == 1
    assert list((ingestor.store.root / "studies").rglob("*.dcm")) == [
        ingestor.store.absolute(
            ingestor.store.relative_path(
                first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID
            )
        )
    ]
    assert send(ingestor, second).duplicate is False  # type: ignore[attr-defined]


def test_an_indexed_file_removed_by_hand_is_written_again_by_a_resend(
    ingestor: Ingestor,
) -> None:
    ds = make_series(1)[0]
    kept = send(ingestor, ds)
    path = ingestor.store.absolute(kept.path)  # type: ignore[attr-defined]
    path.unlink()
    again = send(ingestor, ds)
    assert again.duplicate  # type: ignore[attr-defined]
    assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    assert count(ingestor.engine, Instance) == 1


def test_instances_of_a_known_series_are_indexed_like_the_first(ingestor: Ingestor) -> None:
    """The first instance of a series is indexed through SQLAlchemy, the next ones (on SQLite)
    on the driver's cursor: the rows must not tell which."""
    series = make_series(3)
    for ds in series:
        send(ingestor, ds)
    database = ingestor.engine.url.database
    assert database is not None
    db = sqlite3.connect(database)
    db.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in db.execute("SELECT * FROM instances ORDER BY id")]
        study = dict(db.execute("SELECT * FROM studies").fetchone())
        series_row = dict(db.execute("SELECT * FROM series").fetchone())
    finally:
        db.close()
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$")
    # The size varies with the lengths of the generated UIDs: checked against the files.
    varying = {"id", "sop_instance_uid", "instance_number", "path", "received_at", "size_bytes"}
    first = {k: v for k, v in rows[0].items() if k not in varying}
    for row in rows:
        assert stamp.match(row["received_at"]), row["received_at"]
        assert {k: v for k, v in row.items() if k not in varying} == first
        assert {k: type(v) for k, v in row.items()} == {k: type(v) for k, v in rows[0].items()}
    assert [r["instance_number"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["size_bytes"] == ingestor.store.absolute(row["path"]).stat().st_size
    assert (study["instances"], series_row["instances"]) == (3, 3)
    assert study["size_bytes"] == series_row["size_bytes"] == sum(r["size_bytes"] for r in rows)
    assert stamp.match(study["last_received_at"]) and stamp.match(series_row["last_received_at"])
    assert study["last_received_at"] == rows[-1]["received_at"]


def test_late_instance_reopens_the_study_as_version_2(ingestor: Ingestor) -> None:
    first, second, late = make_series(3)
    send(ingestor, first)
    send(ingestor, second)
    monitor = CompletionMonitor(ingestor.engine, CompletionSettings(settle_seconds=5))
    assert [c.version for c in monitor.check(now=utcnow() + timedelta(seconds=6))] == [1]
    send(ingestor, late)
    with ingestor.engine.connect() as conn:
        study = conn.execute(select(Study.state, Study.version, Study.instances)).one()
        rows = conn.execute(select(Instance.sop_instance_uid, Instance.study_version)).all()
    versions = {uid: version for uid, version in rows}
    assert tuple(study) == ("receiving", 2, 3)
    assert versions == {
        first.SOPInstanceUID: 1,
        second.SOPInstanceUID: 1,
        late.SOPInstanceUID: 2,
    }
    done = monitor.check(now=utcnow() + timedelta(seconds=6))
    assert [(c.version, c.instances) for c in done] == [(2, 3)]


@pytest.mark.parametrize(
    ("remove", "reason"),
    [
        ("StudyInstanceUID", "missing StudyInstanceUID"),
        ("SeriesInstanceUID", "missing SeriesInstanceUID"),
        ("SOPInstanceUID", "missing SOPInstanceUID"),
    ],
)
def test_missing_uid_is_quarantined_with_reason(
    ingestor: Ingestor, remove: str, reason: str
) -> None:
    ds = make_series(1)[0]
    request_uid = str(ds.SOPInstanceUID)
    delattr(ds, remove)
    with pytest.raises(QuarantinedError) as info:
        send(ingestor, ds, request_uid=request_uid)
    assert reason in info.value.reason
    [(data, meta)] = quarantined(ingestor)
    assert reason in str(meta["reason"])
    assert meta["calling_ae"] == "MODALITY"
    assert data.read_bytes().endswith(encoded(ds))  # kept as received, behind a file meta
    assert count(ingestor.engine, Instance) == 0
    assert count(ingestor.engine, QuarantineRecord) == 1
    assert not list((ingestor.store.root / "studies").rglob("*"))


def test_sop_uid_differing_from_request_is_quarantined(ingestor: Ingestor) -> None:
    ds = make_series(1)[0]
    with pytest.raises(QuarantinedError, match="differs from the C-STORE request"):
        send(ingestor, ds, request_uid="1.2.3.4.5")
    assert count(ingestor.engine, Instance) == 0
    assert len(quarantined(ingestor)) == 1


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (os.urandom(4096), "not a readable DICOM instance"),
        (b"this is a text file, not DICOM\n" * 10, "not a readable DICOM instance"),
        (b"", "too short"),
    ],
    ids=["random", "text", "empty"],
)
def test_unreadable_files_are_quarantined(
    ingestor: Ingestor, tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "dropped.dcm"
    path.write_bytes(content)
    with pytest.raises(QuarantinedError) as info:
        ingestor.ingest_file(path, Source(kind="folder", folder=str(tmp_path)))
    [(data, meta)] = quarantined(ingestor)
    assert data.read_bytes() == content
    assert meta["reason"] == info.value.reason and reason in info.value.reason
    assert meta["original_name"] == str(path)
    assert count(ingestor.engine, Instance) == 0


def test_truncated_file_is_quarantined_or_stored_whole(
    ingestor: Ingestor, tmp_path: Path, ct_files: list[Path]
) -> None:
    data = ct_files[0].read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:300])  # inside the header: cannot be indexed
    with pytest.raises(QuarantinedError):
        ingestor.ingest_file(cut, Source(kind="folder", folder=str(tmp_path)))
    assert count(ingestor.engine, Instance) == 0
    assert len(quarantined(ingestor)) == 1


def test_hostile_uids_in_the_dataset_stay_under_the_storage_root(
    ingestor: Ingestor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pydicom would warn about the invalid UIDs (warnings are errors here); a sender does not care.
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    ds = make_series(1)[0]
    ds.StudyInstanceUID = "../../../../tmp/evil"
    ds.SeriesInstanceUID = "1.2.3/../../x"
    result = send(ingestor, ds)
    path = ingestor.store.absolute(result.path).resolve()  # type: ignore[attr-defined]
    assert path.is_relative_to((ingestor.store.root / "studies").resolve())
    assert pydicom.dcmread(path).StudyInstanceUID == "../../../../tmp/evil"
    with ingestor.engine.connect() as conn:
        assert conn.execute(select(Study.study_instance_uid)).scalar_one() == ds.StudyInstanceUID


def _part10(ds: Dataset, declared: str, body_ts: str, preamble: bool = True) -> bytes:
    """A Part 10 file whose file meta declares ``declared`` but whose data set is encoded
    in ``body_ts`` (as some exporters write them), with or without the 128-byte preamble."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = declared
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1475.99"
    fp = DicomBytesIO()
    if preamble:
        fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue() + encoded(ds, body_ts)


@pytest.mark.parametrize(
    ("declared", "body_ts", "preamble"),
    [
        (ExplicitVRLittleEndian, ImplicitVRLittleEndian, True),
        (ImplicitVRLittleEndian, ExplicitVRLittleEndian, True),
        (ImplicitVRLittleEndian, ImplicitVRLittleEndian, False),
        (ExplicitVRLittleEndian, ExplicitVRLittleEndian, False),
    ],
)
def test_file_is_indexed_in_the_encoding_its_data_set_has(
    ingestor: Ingestor, tmp_path: Path, declared: str, body_ts: str, preamble: bool
) -> None:
    """Forwarding sends a stored file's data set under the indexed transfer syntax, so the
    index records the encoding the data set really has (file meta with or without preamble),
    and the file itself is kept byte for byte."""
    [ds] = make_series(1, patient_id="ENCODING01")
    data = _part10(ds, declared, body_ts, preamble)
    path = tmp_path / "exported.dcm"
    path.write_bytes(data)
    result = ingestor.ingest_file(path, Source(kind="folder", folder=str(tmp_path)))
    assert ingestor.store.absolute(result.path).read_bytes() == data
    with ingestor.engine.connect() as conn:
        ts, patient = conn.execute(
            select(Instance.transfer_syntax_uid, Study.patient_id).join(
                Study, Study.id == Instance.study_pk
            )
        ).one()
    assert (ts, patient) == (body_ts, "ENCODING01")


@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"])
def test_deflated_data_sets_are_indexed(ingestor: Ingestor, ts: str) -> None:
    """Deflated Explicit VR Little Endian and JPIP Referenced Deflate both deflate the whole
    data set: each is read (inflated) for the index and stored as received."""
    import zlib

    [ds] = make_series(1, patient_id="DEFLATE01")
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = compressor.compress(encoded(ds)) + compressor.flush()
    result = ingestor.ingest_network(body, ts, str(ds.SOPClassUID), str(ds.SOPInstanceUID), SCU)
    assert not result.duplicate
    stored = ingestor.store.absolute(result.path).read_bytes()
    assert stored.endswith(body)
    with ingestor.engine.connect() as conn:
        assert conn.execute(select(Study.patient_id)).scalar_one() == "DEFLATE01"


def test_a_received_file_image_is_stored_from_its_buffer(
    ingestor: Ingestor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receive path gathers file meta and data set in one aligned buffer: that image is
    what is written (not the parts joined again), and the file is what the parts make. An
    image whose file meta is not the instance's is not used."""
    from dicomnode import _pynetdicom_fast
    from dicomnode.ingest import file_meta_bytes

    written: list[str] = []
    put_image = ingestor.store.put_image

    def recorded(relative: str, image: Any) -> int:
        written.append(relative)
        return put_image(relative, image)

    monkeypatch.setattr(ingestor.store, "put_image", recorded)
    first, second = make_series(2, patient_id="IMAGE01")
    for ds, calling in ((first, "MODALITY"), (second, "SOMEONE")):
        body = encoded(ds)
        request = _pynetdicom_fast._Request(
            1, 1, ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian
        )
        meta = file_meta_bytes(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, calling)
        request.start(_pynetdicom_fast._Buffer(), meta, len(body))
        request.add(memoryview(body))
        result = ingestor.ingest_network(
            request.data_set(),
            ExplicitVRLittleEndian,
            ds.SOPClassUID,
            ds.SOPInstanceUID,
            SCU,
            request.image(),
        )
        expected = file_meta_bytes(
            ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, "MODALITY"
        )
        assert ingestor.store.absolute(result.path).read_bytes() == expected + body
    assert len(written) == 1  # the second image's meta names another calling AE
