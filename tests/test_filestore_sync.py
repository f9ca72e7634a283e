"""Concurrent renames into one folder share its fsyncs, and each still waits for one that
started after its rename."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest

from storage import filestore
from storage.filestore import FileStore


def test_concurrent_commits_share_folder_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = itertools.count()
    clock_lock = threading.Lock()
    fsyncs: list[tuple[int, int]] = []  # (start tick, end tick) of each real folder fsync
    real = filestore._fsync_dir

    def tick() -> int:
        with clock_lock:
            return next(clock)

    def recorded(path: str | Path) -> None:
        start = tick()
        real(path)
        fsyncs.append((start, tick()))

    monkeypatch.setattr(filestore, "_fsync_dir", recorded)
    store = FileStore(tmp_path / "root")
    store.prepare()
    calls: list[tuple[int, int]] = []  # (tick after the rename, tick on return)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(20):
                tmp, _ = store.write_temp([b"x" * 100])
                final = store.root / "studies/1.2/1.3" / f"{n}.{i}.dcm"
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp.replace(final)
                renamed = tick()
                store._sync_dir(final.parent)  # what commit_temp does after its rename
                calls.append((renamed, tick()))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert len(calls) == 120
    for renamed, returned in calls:
        assert any(renamed < start and end < returned for start, end in fsyncs)
    # Shared: fewer fsyncs than commits (six threads commit into the same folder).
    assert len(fsyncs) < len(calls)


def test_commit_temp_fsyncs_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    real = filestore._fsync_dir

    def recorded(path: str | Path) -> None:
        real(path)
        synced.append(Path(path))

    monkeypatch.setattr(filestore, "_fsync_dir", recorded)
    store = FileStore(tmp_path / "root")
    store.prepare()
    tmp, _ = store.write_temp([b"data"])
    final = store.commit_temp(tmp, "studies/1.2/1.3/1.4.dcm")
    assert final.read_bytes() == b"data"
    assert synced[-1] == final.parent
