"""The watched drop folder, through a real ``dicomnode serve``: files are taken only when
completely written, stored through the same ingest path as the SCP, removed only after they
are kept, broken input quarantined with a reason, symbolic links never followed.

The test node watches ``node.data / "incoming"`` with stable_seconds 0.5 and poll_seconds 1;
unfinished_seconds and abandoned_seconds keep their defaults (30 s, 300 s) unless a test sets
them.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import time
import zlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.fileset import FileSet
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicomnode.errors import ConfigError
from dicomnode.ingest import Ingestor
from dicomnode.partial import unfinished, unfinished_dataset
from dicomnode.settings import WatchFolder, load_settings
from dicomnode.watch import FolderWatcher
from storage.db import make_engine, upgrade_schema
from storage.filestore import FileStore
from tests.conftest import RunningNode, wait_for
from tests.dicomgen import make_series, write_series

MakeNode = Callable[..., RunningNode]
# The signals the watcher asks leases to be broken with, when nothing else handles them.
_LEASE_SIGNALS = (signal.SIGURG, signal.SIGWINCH)
REPO_ROOT = Path(__file__).resolve().parent.parent


# --- helpers ----------------------------------------------------------------------------------


def incoming(node: RunningNode) -> Path:
    return node.data / "incoming"


def entries(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files, folders) under ``folder``, symbolic links listed as files and never followed."""
    files: list[Path] = []
    folders: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        base = Path(dirpath)
        for name in dirnames:
            p = base / name
            (files if p.is_symlink() else folders).append(p)
        files.extend(base / name for name in filenames)
    return sorted(files), sorted(folders)


def drop_folder_empty(node: RunningNode) -> bool:
    return not entries(incoming(node))[0]


def stored_by_uid(node: RunningNode) -> dict[str, Path]:
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
        for p in node.storage_files()
    }


def wait_stored(node: RunningNode, count: int, timeout: float = 30.0) -> dict[str, Path]:
    """Wait until ``count`` instances are in the store and the drop folder holds no file."""
    wait_for(
        lambda: len(node.storage_files()) >= count and drop_folder_empty(node),
        timeout=timeout,
        what=f"{count} instances stored and the drop folder emptied",
    )
    return stored_by_uid(node)


def total_instances(studies: list[dict[str, Any]]) -> int:
    return sum(int(s["instances"]) for s in studies)


def series_files(tmp_path: Path, n: int, name: str = "ct", **kw: Any) -> list[Path]:
    return write_series(tmp_path / name, make_series(n, **kw))


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def report_cut_between_elements() -> tuple[bytes, int]:
    """A Basic Text SR file, and where a cut between two top-level elements leaves a
    prefix that is structurally whole (the last element, a 2 KB Text Value, missing)."""
    (ds,) = make_series(1, rows=8, columns=8)
    del ds[0x00280000:0x00290000]
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.Modality = "SR"
    ds.add_new(0x0040A160, "UT", "Findings. " * 200)  # Text Value, the last element
    fp = BytesIO()
    ds.save_as(fp, enforce_file_format=True)
    data = fp.getvalue()
    cut = len(data) - len(_encoded(ds[0x0040A160:0x0040A161]))
    assert unfinished(data[:cut]) is None and unfinished(data) is None
    return data, cut


def watching_node(make_node: MakeNode, **watch: Any) -> RunningNode:
    """A node whose drop folder has these settings on top of the test defaults."""
    node = make_node(start=False)
    node.config["watch"][0].update(watch)
    node.config_path.write_text(yaml.safe_dump(node.config))
    return node.start()


def write_with_a_pause(node: RunningNode, target: Path, data: bytes, cut: int) -> None:
    """Write ``data`` through one handle, pausing 3 s (past stable_seconds) after ``cut``
    bytes; the node must leave the file alone meanwhile."""
    with target.open("wb") as out:
        out.write(data[:cut])
        out.flush()
        time.sleep(3)  # the writer pausing, not a wait for the node
        assert_untouched(node, target)
        out.write(data[cut:])


def assert_untouched(node: RunningNode, target: Path) -> None:
    """The file is still in the drop folder and nothing was stored or quarantined."""
    assert target.exists(), f"{target.name} was taken from the drop folder before it was whole"
    assert node.storage_files() == []
    assert node.quarantined() == []


def assert_stored_once(node: RunningNode, data: bytes) -> None:
    """``data`` is in the store byte for byte, as the only instance, and nothing is in
    quarantine; the drop folder is empty."""
    stored = wait_stored(node, 1)
    assert [p.read_bytes() == data for p in stored.values()] == [True]
    assert node.quarantined() == []
    (study,) = node.studies()
    assert study["instances"] == 1 and study["duplicates"] == 0


# --- dropped files ----------------------------------------------------------------------------


def test_dropped_files_and_nested_folders_are_stored_indexed_and_removed(
    make_node: MakeNode, tmp_path: Path
) -> None:
    node = make_node(start=False)
    node.config["watch"][0]["empty_folder_seconds"] = 1
    node.config_path.write_text(yaml.safe_dump(node.config))
    node.start()
    ct = series_files(tmp_path, 5, "ct", modality="CT", patient_id="PAT001")
    mr = series_files(tmp_path, 4, "mr", modality="MR", patient_id="PAT002")
    for f in ct:
        shutil.copyfile(f, incoming(node) / f.name)
    nested = incoming(node) / "export" / "2026" / "MR head"
    nested.mkdir(parents=True)
    for f in mr:
        shutil.copyfile(f, nested / f.name)

    stored = wait_stored(node, 9)
    # Stored exactly as dropped, byte for byte.
    for f in ct + mr:
        assert stored[sop_uid(f)].read_bytes() == f.read_bytes()

    studies = {s["patient_id"]: s for s in node.studies()}
    assert sorted(studies) == ["PAT001", "PAT002"]
    assert studies["PAT001"]["instances"] == 5
    assert studies["PAT002"]["instances"] == 4
    assert studies["PAT002"]["series"][0]["modality"] == "MR"
    folder = str(incoming(node).resolve())
    for s in studies.values():
        assert [se["source"] for se in s["series"]] == [{"folder": folder}]
        assert s["duplicates"] == 0
    assert node.quarantined() == []
    # The emptied sub-folders are cleaned up; the drop folder itself stays.
    wait_for(lambda: entries(incoming(node)) == ([], []), timeout=15, what="empty folders removed")
    assert incoming(node).is_dir()


def test_dicomdir_set_is_ingested_and_dicomdir_kept_in_quarantine(
    make_node: MakeNode, tmp_path: Path
) -> None:
    node = make_node()
    fs = FileSet()
    datasets = make_series(4, modality="CT", series_number=1) + make_series(
        3, modality="MR", series_number=2, patient_id="PAT009"
    )
    for ds in datasets:
        fs.add(ds)
    media = tmp_path / "media"
    try:
        fs.write(media)
    finally:
        fs._stage["t"].cleanup()  # FileSet stages in a TemporaryDirectory it never closes
    members = [p for p in entries(media)[0] if p.name != "DICOMDIR"]
    assert len(members) == 7 and (media / "DICOMDIR").is_file()
    dicomdir = (media / "DICOMDIR").read_bytes()

    shutil.copytree(media, incoming(node) / "CD")

    stored = wait_stored(node, 7)
    assert sorted(stored) == sorted(str(ds.SOPInstanceUID) for ds in datasets)
    assert total_instances(node.studies()) == 7
    # The DICOMDIR is not an instance: it is kept, with a reason, not stored or dropped.
    (kept,) = node.quarantined()
    assert "DICOMDIR" in kept["reason"]
    assert kept["original_name"].endswith("DICOMDIR")
    assert (
        node.data / "storage" / "quarantine" / kept["received_at"][:10] / kept["file"]
    ).read_bytes() == dicomdir


# --- readiness --------------------------------------------------------------------------------


def test_slow_writer_is_taken_only_once_complete(make_node: MakeNode, tmp_path: Path) -> None:
    node = make_node()
    (src,) = series_files(tmp_path, 1, rows=128, columns=128)
    data = src.read_bytes()
    target = incoming(node) / "slow.dcm"
    with target.open("wb") as out:
        # Header and part of the pixel data, then a pause well past stable_seconds (0.5 s)
        # and a full rescan period (1 s) while the file stays open.
        out.write(data[: len(data) * 2 // 5])
        out.flush()
        time.sleep(2.5)  # the slow writer under test, not a wait for the node
        assert target.exists(), "a half-written file was taken from the drop folder"
        assert node.storage_files() == []
        assert node.quarantined() == []
        out.write(data[len(data) * 2 // 5 :])

    stored = wait_stored(node, 1)
    assert stored[sop_uid(src)].read_bytes() == data
    assert node.quarantined() == []
    assert total_instances(node.studies()) == 1


def test_writer_paused_before_the_pixel_data_is_waited_for(
    make_node: MakeNode, tmp_path: Path
) -> None:
    """A CT file written through one handle: everything before group 0028 (about 1 KB), a
    pause past stable_seconds and a rescan, then the 512 KB of pixel data."""
    node = make_node()
    (src,) = series_files(tmp_path, 1, rows=512, columns=512)
    data = src.read_bytes()
    rows = data.index(b"\x28\x00\x10\x00US")  # (0028,0010) Rows, explicit VR little endian
    assert rows < 2000 and len(data) - rows > 512 * 1024
    write_with_a_pause(node, incoming(node) / "paused.dcm", data, rows)
    assert_stored_once(node, data)


def test_writer_paused_at_an_element_boundary_is_waited_for_while_it_holds_the_file(
    make_node: MakeNode, tmp_path: Path
) -> None:
    """A structured report cut between two elements looks whole: only its writer still
    having it open says otherwise (the node sees that through a lease)."""
    node = make_node()
    data, cut = report_cut_between_elements()
    write_with_a_pause(node, incoming(node) / "report.dcm", data, cut)
    assert_stored_once(node, data)
    assert "cannot tell whether" not in node.log()


def test_without_leases_a_file_seen_written_is_waited_for_until_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Where leases cannot be taken (here: both spare signals are handled in the process),
    inotify having seen the file written and not yet closed keeps it waiting."""
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    upgrade_schema(engine)
    store = FileStore(tmp_path / "storage")
    store.prepare()
    drop = tmp_path / "incoming"
    settings = WatchFolder(path=drop, stable_seconds=0.5, poll_seconds=1)
    watcher = FolderWatcher(settings, Ingestor(engine, store))
    handled = {signum: signal.signal(signum, lambda *_: None) for signum in _LEASE_SIGNALS}
    try:
        with caplog.at_level(logging.INFO, logger="dicomnode.watch"):
            watcher.start()
        assert "cannot tell whether files in" in caplog.text
        data, cut = report_cut_between_elements()
        target = drop / "report.dcm"
        with target.open("wb") as out:
            out.write(data[:cut])
            out.flush()
            time.sleep(3)  # the writer pausing, not a wait for the watcher
            assert target.exists() and watcher.stored == watcher.quarantined == 0
            out.write(data[cut:])
        wait_for(lambda: watcher.stored == 1 and not target.exists(), what="the report taken")
        (kept,) = (tmp_path / "storage" / "studies").rglob("*.dcm")
        assert kept.read_bytes() == data and watcher.quarantined == 0
    finally:
        watcher.stop()
        for signum, handler in handled.items():
            signal.signal(signum, handler)
        engine.dispose()


def test_writer_appending_through_several_opens_is_taken_once_whole(
    make_node: MakeNode, tmp_path: Path
) -> None:
    """Like ``cat part >> f`` or a resumed transfer: each piece is appended through a new
    handle, closed in between, the file cut short (or before its pixel data) each time."""
    node = make_node()
    (src,) = series_files(tmp_path, 1, rows=256, columns=256)
    data = src.read_bytes()
    rows = data.index(b"\x28\x00\x10\x00US")
    cuts = [0, rows, rows + 1000, len(data) // 2, len(data)]
    target = incoming(node) / "appended.dcm"
    for start, end in itertools.pairwise(cuts):
        with target.open("ab") as out:
            out.write(data[start:end])
        if end < len(data):
            time.sleep(1.5)  # the writer between two pieces, not a wait for the node
            assert_untouched(node, target)
    assert_stored_once(node, data)


def test_empty_file_replaced_by_a_copy_leaves_no_junk(make_node: MakeNode, tmp_path: Path) -> None:
    """``touch b.dcm``, then seconds later ``cp`` over it."""
    node = make_node()
    (src,) = series_files(tmp_path, 1)
    target = incoming(node) / "b.dcm"
    target.touch()
    time.sleep(2)  # the writer being slow, not a wait for the node
    assert_untouched(node, target)
    shutil.copyfile(src, target)
    assert_stored_once(node, src.read_bytes())


def test_file_kept_open_after_writing_is_taken_once_abandoned(
    make_node: MakeNode, tmp_path: Path
) -> None:
    """A whole file its writer keeps open is not taken at stable_seconds (the writer could
    add more), only once unchanged for abandoned_seconds, with a warning."""
    node = watching_node(make_node, abandoned_seconds=4)
    (src,) = series_files(tmp_path, 1)
    data = src.read_bytes()
    target = incoming(node) / "held-open.dcm"
    with target.open("wb") as out:
        out.write(data)
        out.flush()
        time.sleep(2)  # the writer holding on to it, not a wait for the node
        assert_untouched(node, target)
        # No close event will come while we wait.
        assert_stored_once(node, data)
    assert "held-open.dcm is still open for writing by another process" in node.log()


def test_rename_into_place_is_ingested_once_and_temporary_names_left_alone(
    make_node: MakeNode, tmp_path: Path
) -> None:
    node = make_node()
    *files, more = series_files(tmp_path, 4)
    staged = [
        (incoming(node) / "a.dcm.tmp", incoming(node) / "a.dcm"),
        (incoming(node) / ".b.dcm", incoming(node) / "b.dcm"),
        (incoming(node) / "c.part", incoming(node) / "c"),
    ]
    for f, (tmp, _final) in zip(files, staged, strict=True):
        tmp.write_bytes(f.read_bytes())
    # An exporter that creates its folder first and fills it later.
    export = incoming(node) / "export in progress"
    export.mkdir()
    # Closed, complete files under temporary names: a watcher that takes them would make
    # the writers' renames below fail.
    time.sleep(3.2)  # the writers being slow, not a wait for the node
    assert sorted(p.name for p in entries(incoming(node))[0]) == [".b.dcm", "a.dcm.tmp", "c.part"]
    for tmp, final in staged:
        os.rename(tmp, final)
    shutil.copyfile(more, export / "late.dcm")

    stored = wait_stored(node, 4)
    assert sorted(stored) == sorted(sop_uid(f) for f in [*files, more])
    (study,) = node.studies()
    assert study["instances"] == 4 and study["duplicates"] == 0
    assert node.quarantined() == []


# --- broken input -----------------------------------------------------------------------------


def test_non_dicom_and_truncated_files_are_quarantined_with_a_reason(
    make_node: MakeNode, tmp_path: Path
) -> None:
    # Short or cut files are waited for unfinished_seconds after their writer closed them.
    node = watching_node(make_node, unfinished_seconds=2)
    (ct,) = series_files(tmp_path, 1)
    data = ct.read_bytes()
    inputs = {
        "notes.txt": b"This is not DICOM.\n",
        "random.dcm": os.urandom(4096),
        "empty.dcm": b"",
        "truncated.dcm": data[: len(data) * 3 // 5],
        "header-only.dcm": data[:200],
    }
    for name, content in inputs.items():
        (incoming(node) / name).write_bytes(content)

    records = wait_for(
        lambda: len(q := node.quarantined()) == len(inputs) and drop_folder_empty(node) and q,
        timeout=20,
        what="all broken files quarantined",
    )
    by_name = {Path(r["original_name"]).name: r for r in records}
    assert sorted(by_name) == sorted(inputs)
    folder = node.data / "storage" / "quarantine"
    for name, content in inputs.items():
        record = by_name[name]
        assert record["reason"], name
        assert record["source"].startswith("folder "), name
        assert (folder / record["received_at"][:10] / record["file"]).read_bytes() == content
    assert "trunc" in by_name["truncated.dcm"]["reason"].lower()
    assert "trunc" in by_name["header-only.dcm"]["reason"].lower()
    # Nothing broken made it into the store or the index; the node is still up.
    assert node.storage_files() == []
    assert node.studies() == []
    assert node.proc is not None and node.proc.poll() is None
    # The index names each file: its original path under the watched folder.
    rows = json.loads(node.cli("quarantine", "--json").stdout)
    drop = incoming(node).resolve()
    assert sorted(r["original_name"] for r in rows) == sorted(str(drop / n) for n in inputs)
    for row in rows:
        record = by_name[Path(row["original_name"]).name]
        assert row["reason"] == record["reason"]
        assert row["path"].endswith(record["file"])
        assert (row["sop_instance_uid"], row["calling_ae"], row["peer_address"]) == (None,) * 3
    text = node.cli("quarantine").stdout
    for name, record in by_name.items():
        assert f"  {name} (folder {drop}): {record['reason']}\n" in text


def test_file_that_cannot_be_stored_is_left_in_place_and_retried(
    make_node: MakeNode, tmp_path: Path
) -> None:
    node = make_node()
    (src,) = series_files(tmp_path, 1)
    # Break the store without relying on permissions (the tests may run as root): its
    # temporary folder becomes a plain file, so every durable write fails.
    tmp_dir = node.data / "storage" / "tmp"
    shutil.rmtree(tmp_dir)
    tmp_dir.write_bytes(b"")
    target = incoming(node) / "keep-me.dcm"
    shutil.copyfile(src, target)

    wait_for(lambda: "could not store" in node.log(), timeout=15, what="a storage failure")
    assert target.read_bytes() == src.read_bytes()
    assert node.storage_files() == []
    assert node.quarantined() == []

    tmp_dir.unlink()
    tmp_dir.mkdir()
    stored = wait_stored(node, 1, timeout=30)
    assert stored[sop_uid(src)].read_bytes() == src.read_bytes()
    assert node.quarantined() == []
    assert total_instances(node.studies()) == 1


# --- restarts, names, links -------------------------------------------------------------------


def test_files_dropped_while_the_node_was_down_are_ingested_at_start(
    make_node: MakeNode, tmp_path: Path
) -> None:
    node = make_node()
    node.stop()
    files = series_files(tmp_path, 6)
    for f in files[:3]:
        shutil.copyfile(f, incoming(node) / f.name)
    (incoming(node) / "later" / "deeper").mkdir(parents=True)
    for f in files[3:]:
        shutil.copyfile(f, incoming(node) / "later" / "deeper" / f.name)
    node.start()

    stored = wait_stored(node, 6)
    assert sorted(stored) == sorted(sop_uid(f) for f in files)
    assert total_instances(node.studies()) == 6
    assert node.quarantined() == []


def test_odd_file_names(make_node: MakeNode, tmp_path: Path) -> None:
    node = make_node()
    names: list[str | bytes] = [
        "with spaces and 'quotes'.dcm",
        "ünïcødé 患者 ☢.dcm",
        "x" * 240 + ".dcm",
        "-rf $(touch pwned); `id`.dcm",
        "line\nbreak\ttab.dcm",
        "DICOMDIR.bak",
        b"latin1-\xe9\xff.dcm",  # not UTF-8
    ]
    files = series_files(tmp_path, len(names))
    for f, name in zip(files, names, strict=True):
        dest = os.path.join(os.fsencode(incoming(node)), os.fsencode(name))
        shutil.copyfile(f, dest)

    stored = wait_stored(node, len(names))
    assert sorted(stored) == sorted(sop_uid(f) for f in files)
    assert node.quarantined() == []
    assert not (REPO_ROOT / "pwned").exists() and not (node.data / "pwned").exists()
    assert node.proc is not None and node.proc.poll() is None


def test_symbolic_links_are_not_followed_and_targets_are_untouched(
    make_node: MakeNode, tmp_path: Path
) -> None:
    node = make_node()
    outside = tmp_path / "outside"
    outside_files = series_files(outside, 3, "folder")
    (lone,) = series_files(outside, 1, "lone")
    before = {p: p.read_bytes() for p in [*outside_files, lone]}
    barrier = series_files(tmp_path, 2, "barrier")

    drop = incoming(node)
    (drop / "file-link.dcm").symlink_to(lone)
    (drop / "folder-link").symlink_to(outside / "folder", target_is_directory=True)
    (drop / "sub").mkdir()
    # A link that escapes upwards, to the node's own data (config, index, store).
    (drop / "sub" / "up").symlink_to(node.data, target_is_directory=True)
    (drop / "dangling.dcm").symlink_to(tmp_path / "does-not-exist.dcm")
    os.mkfifo(drop / "fifo.dcm")  # opening it to read would block the watcher for good
    links = sorted(p for p in entries(drop)[0])
    # A file written through the folder link lands outside and must stay there.
    shutil.copyfile(barrier[0], drop / "folder-link" / "written-through-link.dcm")
    shutil.copyfile(barrier[1], drop / "sub" / "real.dcm")
    wait_for(lambda: not (drop / "sub" / "real.dcm").exists(), what="the real file taken")

    # Again from a cold start, when the whole folder is scanned.
    node.stop()
    (late,) = series_files(tmp_path, 1, "late")
    shutil.copyfile(late, drop / "late.dcm")
    node.start()
    wait_for(lambda: not (drop / "late.dcm").exists(), what="the file dropped while down taken")

    assert sorted(stored_by_uid(node)) == sorted([sop_uid(barrier[1]), sop_uid(late)])
    assert node.quarantined() == []
    assert sorted(p for p in entries(drop)[0]) == links
    assert all(p.is_symlink() for p in links if p.name != "fifo.dcm")
    for p, content in before.items():
        assert p.read_bytes() == content
    assert (outside / "folder" / "written-through-link.dcm").read_bytes() == barrier[0].read_bytes()
    assert (node.data / "dicomnode.yaml").is_file()
    assert "not following symbolic link" in node.log()


# --- duplicates and bursts --------------------------------------------------------------------


def test_same_file_dropped_twice_is_a_duplicate_stored_once(
    make_node: MakeNode, tmp_path: Path
) -> None:
    node = make_node()
    (src,) = series_files(tmp_path, 1)
    shutil.copyfile(src, incoming(node) / "first.dcm")
    wait_stored(node, 1)
    shutil.copyfile(src, incoming(node) / "first.dcm")
    wait_for(lambda: drop_folder_empty(node), what="the second copy taken")
    shutil.copyfile(src, incoming(node) / "another name.dcm")
    wait_for(lambda: drop_folder_empty(node), what="the third copy taken")

    (study,) = node.studies()
    assert study["instances"] == 1
    assert study["duplicates"] == 2
    assert len(node.storage_files()) == 1
    assert node.quarantined() == []


def test_burst_of_300_files_all_ingested_once(make_node: MakeNode, tmp_path: Path) -> None:
    node = make_node()
    files = series_files(tmp_path, 300, rows=8, columns=8)
    for i, f in enumerate(files):
        # A third straight in, a third in sub-folders, a third renamed into place.
        if i % 3 == 0:
            shutil.copyfile(f, incoming(node) / f.name)
        elif i % 3 == 1:
            sub = incoming(node) / f"batch{i % 7}"
            sub.mkdir(exist_ok=True)
            shutil.copyfile(f, sub / f.name)
        else:
            shutil.copyfile(f, incoming(node) / f".{f.name}")
            os.rename(incoming(node) / f".{f.name}", incoming(node) / f.name)

    stored = wait_stored(node, 300, timeout=90)
    assert sorted(stored) == sorted(sop_uid(f) for f in files)
    (study,) = node.studies()
    assert study["instances"] == 300
    assert study["duplicates"] == 0
    assert node.quarantined() == []


def test_waits_default_from_stable_seconds_and_are_never_shorter(tmp_path: Path) -> None:
    assert WatchFolder(path=tmp_path).unfinished_wait == 30
    assert WatchFolder(path=tmp_path).abandoned_wait == 300
    slow = WatchFolder(path=tmp_path, stable_seconds=20)
    assert (slow.unfinished_wait, slow.abandoned_wait) == (60, 300)
    path = tmp_path / "dicomnode.yaml"
    path.write_text(
        "watch:\n"
        "  - {path: a, stable_seconds: 5, unfinished_seconds: 2}\n"
        "  - {path: b, stable_seconds: 5, abandoned_seconds: 4}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    text = str(info.value)
    assert f"{path}:2: watch[0]:" in text and "unfinished_seconds (2) is shorter than" in text
    assert f"{path}:3: watch[1]:" in text and "abandoned_seconds (4) is shorter than" in text


# --- the completeness check on real files ------------------------------------------------------


def test_completeness_check_on_pydicom_test_files() -> None:
    """Every readable file pydicom ships (all transfer syntaxes, sequences, deflate, big
    endian) is judged whole, but for images stripped of their pixel data, which are judged
    possibly short (not certain); the same file cut inside its last element is judged
    truncated."""
    checked = checked_bare = stripped = 0
    for name in get_testdata_files():
        path = Path(name)
        if not path.is_file() or "truncated" in path.name or "no_meta" in path.name:
            continue
        try:
            ds = pydicom.dcmread(path)
            if "PixelData" in ds:
                ds.PixelData  # noqa: B018 - read it all, so files pydicom rejects are skipped
        except Exception:
            continue
        if "SOPInstanceUID" not in ds:
            continue
        data = path.read_bytes()
        # Indistinguishable from a writer paused before the pixel data.
        pixels = {"PixelData", "FloatPixelData", "DoubleFloatPixelData"} & set(ds.dir())
        image = "Image Storage" in UID(ds.get("SOPClassUID", "")).name and not pixels
        stripped += image
        whole = unfinished(data)
        assert (whole is not None and not whole.certain) if image else whole is None, path.name
        # A deflated file may carry bytes after the end of its deflate stream.
        deflated = "Deflate" in ds.file_meta.TransferSyntaxUID.name
        cut = unfinished(data[: len(data) * 3 // 4 if deflated else -1])
        assert cut is not None and cut.certain, path.name
        # The same checks on the bare data set, as C-STORE carries it.
        if data[128:132] == b"DICM":
            fp = BytesIO(data)
            read_preamble(fp, force=False)
            _read_file_meta_info(fp)
            bare = data[fp.tell() :]
            syntax = str(ds.file_meta.TransferSyntaxUID)
            whole = unfinished_dataset(bare, syntax)
            assert (whole is not None and not whole.certain) if image else whole is None
            cut = unfinished_dataset(bare[: len(bare) * 3 // 4 if deflated else -1], syntax)
            assert cut is not None and cut.certain, path.name
            cut = unfinished_dataset(b"", syntax)
            assert cut is not None and cut.certain, path.name
            checked_bare += 1
        checked += 1
    assert checked > 100
    assert checked_bare > 100
    assert 0 < stripped < checked // 2


def _encoded(ds: pydicom.Dataset, *, implicit: bool = False) -> bytes:
    """``ds`` as a bare little endian data set, as C-STORE carries it."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def test_deflate_is_expected_only_where_the_data_set_is_deflated() -> None:
    """Deflated Image Frame Compression deflates frames, not the data set: a data set cut
    short under it is truncated like any explicit VR one. JPIP Referenced Deflate (and its
    HTJ2K variant) deflate the whole data set, like Deflated Explicit VR Little Endian."""
    (ds,) = make_series(1, rows=16, columns=16)
    data = _encoded(ds)
    frames = "1.2.840.10008.1.2.8.1"
    assert unfinished_dataset(data, frames) is None
    for cut in (len(data) - 1, len(data) // 2, 200):
        verdict = unfinished_dataset(data[:cut], frames)
        assert verdict is not None and verdict.certain, cut
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = packer.compress(data) + packer.flush()
    for syntax in ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"):
        assert unfinished_dataset(deflated, syntax) is None, syntax
        verdict = unfinished_dataset(deflated[: len(deflated) // 2], syntax)
        assert verdict is not None and verdict.certain, syntax


def test_image_cut_anywhere_before_its_pixel_data_is_not_whole() -> None:
    """A writer paused before group 0028 leaves a file that walks as whole: for an image
    SOP class (named in the file meta or the data set) that is not taken as finished."""
    (ds,) = make_series(1, rows=16, columns=16)
    fp = BytesIO()
    ds.save_as(fp, enforce_file_format=True)
    data = fp.getvalue()
    bare = _encoded(ds)
    rows = bare.index(b"\x28\x00\x10\x00")  # (0028,0010) Rows, little endian
    assert unfinished(data) is None and unfinished_dataset(bare, ExplicitVRLittleEndian) is None
    for prefix in (data[: len(data) - len(bare) + rows], bare[:rows]):
        verdict = unfinished(prefix)
        assert verdict is not None and not verdict.certain
        assert "CT Image Storage instance without pixel data" in verdict.reason
    # Only the file meta says what it is, the data set is cut before its SOP Class UID.
    meta_only = data[: len(data) - len(bare) + bare.index(b"\x08\x00\x16\x00")]
    verdict = unfinished(meta_only)
    assert verdict is not None and not verdict.certain and "CT Image" in verdict.reason
    # Not an image: an RT plan has no pixel data, and is whole.
    assert unfinished(Path(str(get_testdata_file("rtplan.dcm"))).read_bytes()) is None
