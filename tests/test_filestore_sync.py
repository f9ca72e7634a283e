"""Concurrent renames into one folder share its fsyncs, and each still waits for one that
started after its rename; file images are written with O_DIRECT, or through the page cache
where that is refused."""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from storage import filestore
from storage.filestore import ALIGNMENT, FileImage, FileStore, aligned


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


def _image(data: bytes) -> tuple[mmap.mmap, FileImage]:
    buffer = mmap.mmap(-1, aligned(len(data)))
    buffer[: len(data)] = data
    return buffer, FileImage(memoryview(buffer), len(data))


def test_file_image_is_stored_byte_for_byte_with_o_direct(tmp_path: Path) -> None:
    """An aligned image is written with O_DIRECT: the file holds exactly its bytes (the
    padding cut off), renamed into place, nothing left in tmp/."""
    data = os.urandom(530_001)
    _, image = _image(data)
    assert image.usable()
    store = FileStore(tmp_path / "root")
    store.prepare()
    assert store.put_image("studies/1.2/1.3/1.4.dcm", image) == len(data)
    assert (store.root / "studies/1.2/1.3/1.4.dcm").read_bytes() == data
    assert store._direct, "O_DIRECT was refused on this file system"
    assert not list(store.tmp_dir.iterdir())


def test_misaligned_or_refused_images_are_written_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image that does not start on a page, and any image on a file system that refuses
    O_DIRECT (EINVAL, as tmpfs did before Linux 6.6), are still stored byte for byte."""
    data = os.urandom(70_000)
    buffer, image = _image(data + b"\0" * ALIGNMENT)
    shifted = FileImage(memoryview(buffer)[1 : 1 + ALIGNMENT * 17], len(data))
    assert not shifted.usable()
    store = FileStore(tmp_path / "root")
    store.prepare()
    shifted_bytes = bytes(shifted.view[: shifted.length])
    store.put_image("studies/a/b/shifted.dcm", shifted)
    assert (store.root / "studies/a/b/shifted.dcm").read_bytes() == shifted_bytes

    real_open = os.open

    def refusing(path: str, flags: int, *args: Any) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(filestore.os, "open", refusing)
    _, image = _image(data)
    store.put_image("studies/a/b/refused.dcm", image)
    assert (store.root / "studies/a/b/refused.dcm").read_bytes() == data
    assert not store._direct  # and it does not try again
    store.put_image("studies/a/b/again.dcm", image)
    assert (store.root / "studies/a/b/again.dcm").read_bytes() == data
