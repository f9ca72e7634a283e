"""kill -9 in the middle of a 500-instance transfer loses nothing that was acknowledged.

DCMTK storescu sends every instance in one association and logs each C-STORE response
(``-v``); the node (its whole process group) is killed with SIGKILL once the index holds at
least 100 instances. After a restart, every instance storescu saw acknowledged must be on disk
and in the index, and every indexed instance must be a complete, parseable file.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.conftest import RunningNode, require_tool, storescu, wait_for
from tests.dicomgen import make_series, write_series

pytestmark = pytest.mark.slow

N_INSTANCES = 500
ROWS = COLUMNS = 128
_SENDING = re.compile(r"^I: Sending file: (.+?)\s*$")
_RESPONSE = re.compile(r"^I: Received Store Response \((\w+)")


@pytest.fixture(scope="module")
def ct500(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, str]:
    """500 generated CT slices (128 x 128) of one series: file path -> SOP Instance UID."""
    folder = tmp_path_factory.mktemp("ct500")
    datasets = make_series(N_INSTANCES, rows=ROWS, columns=COLUMNS, patient_id="CRASH01")
    paths = write_series(folder, datasets)
    return {p: str(ds.SOPInstanceUID) for p, ds in zip(paths, datasets, strict=True)}


def acknowledged(storescu_output: str) -> list[Path]:
    """The files storescu logged a successful C-STORE response for, in order."""
    current: Path | None = None
    ok: list[Path] = []
    for line in storescu_output.splitlines():
        if m := _SENDING.match(line):
            current = Path(m.group(1))
        elif (m := _RESPONSE.match(line)) and current is not None:
            if m.group(1) == "Success":
                ok.append(current)
            current = None
    return ok


def indexed(node: RunningNode) -> dict[str, tuple[str, int]]:
    """SOP Instance UID -> (relative path, size in bytes) straight from the SQLite index."""
    db = node.data / "index.db"
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT sop_instance_uid, path, size_bytes FROM instances").fetchall()
    except sqlite3.OperationalError:  # schema not created yet
        return {}
    finally:
        conn.close()
    return {uid: (path, size) for uid, path, size in rows}


def check_index_consistent(node: RunningNode) -> dict[str, tuple[str, int]]:
    """Every indexed instance is a complete file under studies/ with the indexed SOP UID."""
    rows = indexed(node)
    root = node.data / "storage"
    for uid, (relative, size) in rows.items():
        assert relative.startswith("studies/") and relative.endswith(".dcm"), relative
        assert not relative.endswith(".part")
        path = root / relative
        assert path.is_file(), f"indexed {uid} has no file at {path}"
        assert path.stat().st_size == size, f"{path}: size differs from the index"
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == uid
        assert ds.file_meta.MediaStorageSOPInstanceUID == uid
        assert len(ds.PixelData) == ROWS * COLUMNS * 2, f"{path} is truncated"
    return rows


@pytest.mark.timeout(180)
@pytest.mark.parametrize("processes", [1, 2])
def test_kill_9_during_transfer_loses_nothing_acknowledged(
    make_node, ct500: dict[Path, str], processes: int
) -> None:
    node = make_node(node={"processes": processes})
    files = list(ct500)
    env = {**os.environ, "TCP_NODELAY": "1"}
    cmd = [require_tool("storescu"), "-v", "-aet", "CRASHTEST", "-aec", "DICOMNODE"]
    cmd += ["127.0.0.1", str(node.port), *map(str, files)]
    sender = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        wait_for(
            lambda: len(indexed(node)) >= 100 or sender.poll() is not None,
            timeout=60,
            interval=0.01,
            what="100 instances in the index",
        )
        node.kill()
        out, _ = sender.communicate(timeout=60)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()

    acked = acknowledged(out)
    assert 100 <= len(acked) < N_INSTANCES, (
        f"the kill did not land in the middle of the transfer ({len(acked)} acknowledged)"
    )
    acked_uids = {ct500[p] for p in acked}

    # Before restart: leftovers of the crash may exist in tmp/, none may be indexed.
    tmp = node.data / "storage" / "tmp"
    leftovers = {p.name for p in tmp.glob("*.part")}
    before = check_index_consistent(node)
    assert not leftovers & {Path(rel).name for rel, _ in before.values()}
    missing = acked_uids - before.keys()
    assert not missing, f"{len(missing)} acknowledged instances are not indexed"
    # Nothing indexed that storescu did not send; at most the one in flight beyond the acks.
    assert before.keys() <= set(ct500.values())
    assert len(before) - len(acked_uids) <= 1

    node.start()
    after = check_index_consistent(node)
    assert after == before
    assert not list(tmp.glob("*.part")), "partial writes survive a restart"
    for uid in acked_uids:
        path = node.data / "storage" / after[uid][0]
        assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == uid

    # Re-send everything: all 500 end up stored exactly once, the rest counted as duplicates.
    result = storescu(node.port, files, calling_ae="CRASHTEST")
    assert len(acknowledged(result.stdout + result.stderr)) == N_INSTANCES
    final = check_index_consistent(node)
    assert final.keys() == set(ct500.values())
    on_disk = list((node.data / "storage" / "studies").rglob("*.dcm"))
    assert len(on_disk) == N_INSTANCES
    studies = node.studies()
    assert len(studies) == 1
    assert studies[0]["instances"] == N_INSTANCES
    assert studies[0]["duplicates"] == len(before)
    assert [s["instances"] for s in studies[0]["series"]] == [N_INSTANCES]
    assert not list(tmp.glob("*.part"))


def _children(pid: int) -> list[int]:
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


@pytest.mark.timeout(120)
def test_a_serving_process_that_dies_stops_the_node_with_a_failure(
    make_node, ct_files: list[Path]
) -> None:
    """With several serving processes, one killed must not leave connections waiting on a
    socket fewer processes serve: the node stops with exit code 1 and says why, so that the
    service manager (Restart=on-failure) starts it again."""
    node = make_node(node={"processes": 2})
    assert storescu(node.port, ct_files).returncode == 0
    assert node.proc is not None
    children = _children(node.proc.pid)
    assert len(children) == 2
    os.kill(children[0], 9)
    assert node.proc.wait(timeout=30) == 1
    assert f"serving process {children[0]} ended (killed by signal 9); stopping the node" in (
        node.log()
    )
    # Restarted on the same data, nothing received before is lost.
    node.start()
    assert node.studies()[0]["instances"] == len(ct_files)
