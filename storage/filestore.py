"""The durable file store: temporary name, fsync, rename, fsync of the folder.

A file whose bytes lie in a page-aligned buffer (:class:`FileImage`, as the C-STORE receive
path fills them) is written with ``O_DIRECT``: the bytes go from that buffer to the disk
without being copied into the page cache. Copying them there, allocating the cache pages and
writing them back again cost most of the CPU of storing an instance (on a virtual machine
several times what the copy costs on bare metal). Where ``O_DIRECT`` is not supported (tmpfs,
some network file systems) the store writes through the page cache as usual.

Layout under the storage root::

    studies/<study uid>/<series uid>/<sop instance uid>.dcm
    tmp/                 partial writes (removed at start: nothing there was acknowledged)
    quarantine/<date>/<id>.dcm + <id>.reason.json
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["ALIGNMENT", "FileImage", "FileStore", "aligned", "sanitize_uid"]

logger = logging.getLogger(__name__)

ALIGNMENT = 4096
"""Bytes to which ``O_DIRECT`` buffers, lengths and offsets are aligned (a page; any disk's
logical block size divides it)."""
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def aligned(size: int) -> int:
    """``size`` rounded up to a multiple of ALIGNMENT."""
    return -(-size // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class FileImage:
    """A whole file's bytes, ``view[:length]``, in a buffer that starts on an ``ALIGNMENT``
    boundary and whose length is a multiple of it (what follows ``length`` is padding)."""

    view: memoryview
    length: int

    def usable(self) -> bool:
        """The buffer meets O_DIRECT's alignment (a writable buffer whose address is known)."""
        view = self.view
        if view.readonly or len(view) % ALIGNMENT or len(view) < self.length:
            return False
        try:
            address = ctypes.addressof(ctypes.c_char.from_buffer(view))
        except (TypeError, ValueError):
            return False
        return address % ALIGNMENT == 0


_SAFE_UID = re.compile(r"^[0-9][0-9.]{0,63}$")


def sanitize_uid(uid: str) -> str:
    """A UID as a safe file name; anything not a plain UID gets a hash suffix so two
    different untrusted values never map to the same name."""
    # fullmatch: ``match`` with ``$`` would let a trailing newline through into the name.
    if _SAFE_UID.fullmatch(uid) and ".." not in uid and not uid.endswith("."):
        return uid
    cleaned = re.sub(r"[^0-9.]", "_", uid)[:40].strip(".") or "_"
    # surrogatepass: any str (even a lone surrogate) hashes; distinct strings, distinct bytes.
    digest = hashlib.sha256(uid.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{cleaned}_{digest}"


class FileStore:
    """Durable files under one root folder."""

    def __init__(self, root: Path, quarantine: Path | None = None, fsync: bool = True) -> None:
        self.root = root
        self.quarantine_dir = quarantine if quarantine is not None else root / "quarantine"
        self.tmp_dir = root / "tmp"
        self.fsync = fsync
        self._root = os.fspath(root)
        self._tmp = os.fspath(self.tmp_dir)
        self._known_dirs: set[str] = set()
        self._dir_syncs: dict[str, _DirSync] = {}
        self._dir_syncs_lock = threading.Lock()
        self._direct = bool(_O_DIRECT)  # until the file system refuses it

    def prepare(self) -> None:
        """Create the folders and drop partial writes left by a crash (never acknowledged)."""
        for d in (self.root, self.root / "studies", self.tmp_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp_dir.glob("*.part"):
            leftover.unlink(missing_ok=True)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        return (
            "/".join(
                (
                    "studies",
                    sanitize_uid(study_uid),
                    sanitize_uid(series_uid),
                    sanitize_uid(sop_uid),
                )
            )
            + ".dcm"
        )

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def exists(self, relative: str) -> bool:
        """A file is stored under ``relative``."""
        return os.path.exists(f"{self._root}/{relative}")

    def put(self, relative: str, chunks: Iterable[bytes | memoryview]) -> int:
        """Store chunks durably under ``relative`` (temporary file, fsync, rename, fsync of the
        folder), replacing an unindexed leftover; returns the bytes written."""
        tmp, size = self._write_temp(chunks)
        self._commit_or_remove(tmp, relative)
        return size

    def put_image(self, relative: str, image: FileImage) -> int:
        """Store a file image durably under ``relative``, like :meth:`put`, written with
        O_DIRECT where the file system allows it; returns the bytes stored."""
        if not (self._direct and image.usable()):
            return self.put(relative, (image.view[: image.length],))
        try:
            tmp = self._write_direct(image)
        except _DirectRefused:
            return self.put(relative, (image.view[: image.length],))
        self._commit_or_remove(tmp, relative)
        return image.length

    def write_temp(self, chunks: Iterable[bytes | memoryview]) -> tuple[Path, int]:
        """Write chunks to a new temporary file and fsync it; returns (path, size in bytes)."""
        tmp, size = self._write_temp(chunks)
        return Path(tmp), size

    def commit_temp(self, tmp: Path, relative: str) -> Path:
        """Move a fsynced temporary file to its final name (replacing an unindexed leftover)."""
        return Path(self._commit_temp(os.fspath(tmp), relative))

    # The instance path runs on plain strings: pathlib's parsing and hashing were a tenth of
    # its Python time.

    def _write_temp(self, chunks: Iterable[bytes | memoryview]) -> tuple[str, int]:
        tmp = f"{self._tmp}/{uuid.uuid4().hex}.part"
        size = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                    size += n
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        os.close(fd)
        return tmp, size

    def _write_direct(self, image: FileImage) -> str:
        """Write an image to a new temporary file with O_DIRECT (the padded, aligned buffer,
        then the file cut to its length) and fsync it; raises _DirectRefused (and stops using
        O_DIRECT) when the file system does not support it."""
        tmp = f"{self._tmp}/{uuid.uuid4().hex}.part"
        padded = aligned(image.length)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_DIRECT, 0o640)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._refuse_direct(exc)
        try:
            view = image.view[:padded]
            written = 0
            while written < padded:
                written += os.write(fd, view[written:])
            os.ftruncate(fd, image.length)
            if self.fsync:
                os.fsync(fd)
        except BaseException as exc:
            os.close(fd)
            _unlink(tmp)
            if isinstance(exc, OSError) and exc.errno == errno.EINVAL:
                self._refuse_direct(exc)
            raise
        os.close(fd)
        return tmp

    def _refuse_direct(self, exc: OSError) -> NoReturn:
        if self._direct:
            self._direct = False
            logger.info(
                "%s does not take O_DIRECT writes (%s); writing through the page cache",
                self.root,
                exc.strerror,
            )
        raise _DirectRefused from exc

    def _commit_or_remove(self, tmp: str, relative: str) -> None:
        try:
            self._commit_temp(tmp, relative)
        except BaseException:
            _unlink(tmp)
            raise

    def _commit_temp(self, tmp: str, relative: str) -> str:
        final = f"{self._root}/{relative}"
        folder = final.rpartition("/")[0]
        self._mkdirs(folder)
        os.replace(tmp, final)
        if self.fsync:
            self._sync_dir(folder)
        return final

    def _mkdirs(self, folder: str) -> None:
        if folder in self._known_dirs:
            return
        created = not os.path.exists(folder)
        os.makedirs(folder, exist_ok=True)
        if created and self.fsync:
            # Make the new folder entries durable up to the storage root.
            p = folder
            while p != self._root and os.path.dirname(p) != p:
                p = os.path.dirname(p)
                _fsync_dir(p)
        self._known_dirs.add(folder)
        if len(self._known_dirs) > 10000:
            self._known_dirs.clear()

    def _sync_dir(self, folder: str | Path) -> None:
        key = os.fspath(folder)
        with self._dir_syncs_lock:
            sync = self._dir_syncs.get(key)
            if sync is None:
                if len(self._dir_syncs) > 1000:
                    self._dir_syncs.clear()
                sync = self._dir_syncs[key] = _DirSync(key)
        sync.sync()

    def quarantine(
        self, chunks: Iterable[bytes | memoryview], reason: str, meta: dict[str, Any]
    ) -> Path:
        """Keep rejected input with a JSON reason file beside it; returns the data file's path."""
        day = meta.get("received_at", "")[:10] or "undated"
        folder = self.quarantine_dir / day
        folder.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        tmp, _ = self.write_temp(chunks)
        target = folder / f"{name}.dcm"
        os.replace(tmp, target)
        info = {"reason": reason, **meta, "file": target.name}
        reason_path = folder / f"{name}.reason.json"
        reason_tmp = folder / f".{name}.reason.tmp"
        reason_tmp.write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(reason_tmp, reason_path)
        if self.fsync:
            _fsync_dir(folder)
        return target


class _DirSync:
    """Shared fsyncs of one folder: renames into it by concurrent threads (one per
    association) need one fsync that starts after their rename, not one each."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._cond = threading.Condition()
        self._requested = 0  # renames done and waiting for an fsync
        self._done = 0  # renames covered by a completed fsync
        self._running = False

    def sync(self) -> None:
        """Return once an fsync of the folder that started after this call has completed."""
        with self._cond:
            self._requested += 1
            mine = self._requested
            while self._done < mine:
                if self._running:
                    self._cond.wait()
                    continue
                # Lead an fsync covering every rename requested so far.
                self._running = True
                covers = self._requested
                self._cond.release()
                try:
                    _fsync_dir(self.folder)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                self._done = max(self._done, covers)


class _DirectRefused(Exception):
    """The file system refused an O_DIRECT open or write."""


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
