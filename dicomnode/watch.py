"""Watched drop folders: files are taken when completely written and go through the same
ingest path as the SCP; a source file is removed only after it is stored or quarantined.

Readiness: a close-after-write event (inotify), or a size and mtime unchanged for
``stable_seconds`` *and* a content that is structurally whole (a writer that pauses longer
than that in the middle of a file is waited for; see ``dicomnode.partial``). A file that stays
unfinished without being closed is taken (and quarantined as truncated) once abandoned.
A periodic rescan picks up files dropped while the node was down and any event the kernel
dropped. Symbolic links, special files, hidden names and the temporary names of writers that
rename into place (``x.tmp``, ``x.part``) are never taken.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from dicomnode.errors import QuarantinedError, StorageError
from dicomnode.ingest import Ingestor, Source
from dicomnode.partial import unfinished
from dicomnode.settings import WatchFolder

__all__ = ["FolderWatcher"]

logger = logging.getLogger(__name__)

_DICOMDIR_REASON = (
    "DICOMDIR media index, not an instance; the files it lists are ingested on their own"
)
# Names writers use while a file is in progress, before renaming it into place.
_TEMPORARY_SUFFIXES = (
    ".tmp",
    ".temp",
    ".part",
    ".partial",
    ".crdownload",
    ".download",
    ".filepart",
    ".swp",
    "~",
)
# A file still unfinished and unchanged this long (seconds, at least) is taken as it is.
_ABANDONED_SECONDS = 300.0


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    since: float  # monotonic time of the last change seen
    closed: bool = False  # its writer closed it since the last change
    waiting: bool = False  # looked unfinished at this size; wait for a change or a close


@dataclass(frozen=True)
class _Snapshot:
    size: int
    mtime_ns: int
    inode: int


class _Events(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            if event.event_type in ("created", "moved"):
                self.watcher.request_rescan()
            return
        path = getattr(event, "dest_path", "") or event.src_path
        if event.event_type in ("created", "modified", "moved"):
            self.watcher.notice(Path(os.fsdecode(path)))
        elif event.event_type == "closed":
            self.watcher.notice(Path(os.fsdecode(path)), closed=True)


class FolderWatcher:
    """Ingests every file dropped under one folder."""

    def __init__(self, settings: WatchFolder, ingestor: Ingestor) -> None:
        self.settings = settings
        self.root = settings.path.resolve()
        self.ingestor = ingestor
        self.source = Source(kind="folder", folder=str(self.root))
        self.abandoned_seconds = max(_ABANDONED_SECONDS, 10 * settings.stable_seconds)
        self._pending: dict[Path, _Pending] = {}
        self._failures: dict[Path, tuple[int, float]] = {}
        self._warned: set[Path] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._rescan = threading.Event()
        self._observer: Any = None
        self._thread: threading.Thread | None = None
        self.stored = 0
        self.quarantined = 0

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._observer = Observer()
        self._observer.schedule(_Events(self), str(self.root), recursive=self.settings.recursive)
        self._observer.start()
        self._rescan.set()
        self._thread = threading.Thread(target=self._run, name=f"watch:{self.root}", daemon=True)
        self._thread.start()
        logger.info("watching %s for dropped files", self.root)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=30)

    # --- event intake --------------------------------------------------------------------

    def request_rescan(self) -> None:
        self._rescan.set()
        self._wake.set()

    def notice(self, path: Path, closed: bool = False) -> None:
        """Remember a file that may be ready; ``closed`` means its writer closed it."""
        st = self._acceptable(path)
        if st is None:
            return
        with self._lock:
            entry = self._pending.get(path)
            if entry is None or (entry.size, entry.mtime_ns) != (st.st_size, st.st_mtime_ns):
                entry = _Pending(st.st_size, st.st_mtime_ns, time.monotonic())
                self._pending[path] = entry
            if closed:
                entry.closed = True
        self._wake.set()

    def _acceptable(self, path: Path) -> os.stat_result | None:
        """The file's status if it is ours to take: a regular file inside the folder, reached
        without passing through a symbolic link, not hidden, not a temporary name."""
        try:
            parts = path.relative_to(self.root).parts
        except ValueError:
            return None
        if not parts or any(p.startswith(".") for p in parts):
            return None
        if parts[-1].lower().endswith(_TEMPORARY_SUFFIXES):
            return None
        if not self.settings.recursive and len(parts) > 1:
            return None
        try:
            st = path.lstat()
            # A folder on the way may have been replaced by a link since the event.
            here = self.root
            for part in parts[:-1]:
                here = here / part
                if stat.S_ISLNK(here.lstat().st_mode):
                    self._warn_once(here, "not following symbolic link %s in a watched folder")
                    return None
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            self._warn_once(path, "not following symbolic link %s in a watched folder")
            return None
        if not stat.S_ISREG(st.st_mode):
            self._warn_once(path, "ignoring %s in a watched folder: not a regular file")
            return None
        return st

    def _warn_once(self, path: Path, message: str) -> None:
        if path not in self._warned:
            if len(self._warned) > 10000:
                self._warned.clear()
            self._warned.add(path)
            logger.warning(message, path)

    # --- processing ----------------------------------------------------------------------

    def _run(self) -> None:
        next_scan = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if self._rescan.is_set() or now >= next_scan:
                self._rescan.clear()
                try:
                    self._scan()
                except OSError:
                    logger.exception("rescan of %s failed", self.root)
                next_scan = now + self.settings.poll_seconds
            for path, entry in self._ready():
                if self._stop.is_set():
                    return
                try:
                    self._take(path, entry)
                except Exception:  # never let one file stop the watcher
                    logger.exception("unexpected error taking %s; left in place", path)
                    self._retry_later(path)
            with self._lock:
                active = any(not e.waiting for e in self._pending.values())
            self._wake.wait(0.1 if active else self.settings.poll_seconds)
            self._wake.clear()

    def _scan(self) -> None:
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            base = Path(dirpath)
            if not self.settings.recursive:
                dirnames.clear()
            for name in filenames:
                self.notice(base / name)
        self._remove_empty_folders()
        with self._lock:
            for path in [p for p in self._failures if p not in self._pending]:
                del self._failures[path]

    def _ready(self) -> list[tuple[Path, _Pending]]:
        now = time.monotonic()
        ready: list[tuple[Path, _Pending]] = []
        with self._lock:
            for path, entry in list(self._pending.items()):
                failed = self._failures.get(path)
                if failed is not None and now < failed[1]:
                    continue
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    del self._pending[path]
                    continue
                if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
                    self._pending[path] = _Pending(st.st_size, st.st_mtime_ns, now)
                    continue
                quiet = now - entry.since
                if (
                    entry.closed
                    or quiet >= self.abandoned_seconds
                    or (not entry.waiting and quiet >= self.settings.stable_seconds)
                ):
                    ready.append((path, entry))
                    del self._pending[path]
        return sorted(ready, key=lambda item: item[0])

    def _take(self, path: Path, entry: _Pending) -> None:
        """Store or quarantine one file, then remove it; leave it in place on any failure."""
        try:
            data, before = self._read(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            logger.warning("cannot read %s (%s); left in place", path, exc)
            self._retry_later(path)
            return
        abandoned = time.monotonic() - entry.since >= self.abandoned_seconds
        why = unfinished(data)
        if why is not None and not entry.closed and not abandoned:
            # Stable for stable_seconds but visibly incomplete: its writer has paused.
            logger.debug("%s is not complete yet (%s); waiting", path, why.reason)
            with self._lock:
                self._pending.setdefault(
                    path, _Pending(before.size, before.mtime_ns, entry.since, waiting=True)
                )
            return
        try:
            if path.name.upper() == "DICOMDIR":
                self.ingestor.quarantine_file(path, _DICOMDIR_REASON, self.source, data)
            elif why is not None and why.certain:
                reason = f"truncated DICOM file: {why.reason}"
                self.ingestor.quarantine_file(path, reason, self.source, data)
            else:
                self.ingestor.ingest_file(path, self.source, data)
                self.stored += 1
        except QuarantinedError:
            self.quarantined += 1
        except (StorageError, OSError):
            delay = self._retry_later(path)
            logger.exception("could not store %s; left in place, retry in %.0f s", path, delay)
            return
        self._failures.pop(path, None)
        self._remove_source(path, before)

    def _read(self, path: Path) -> tuple[bytes, _Snapshot]:
        """The file's content, read without following a symbolic link, and its identity."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(f"{path} is no longer a regular file")
            chunks = []
            while chunk := os.read(fd, 1 << 22):
                chunks.append(chunk)
            return b"".join(chunks), _Snapshot(st.st_size, st.st_mtime_ns, st.st_ino)
        finally:
            os.close(fd)

    def _remove_source(self, path: Path, before: _Snapshot) -> None:
        """Remove the source, unless it was changed or replaced after it was read."""
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        if _Snapshot(st.st_size, st.st_mtime_ns, st.st_ino) != before:
            logger.warning("%s changed while it was being stored; taking it again", path)
            self.notice(path)
            return
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def _retry_later(self, path: Path) -> float:
        """Back off before the next attempt at ``path``; returns the delay in seconds."""
        attempts = self._failures.get(path, (0, 0.0))[0] + 1
        delay = min(60.0, 2.0**attempts)
        with self._lock:
            self._failures[path] = (attempts, time.monotonic() + delay)
            self._pending.setdefault(path, _Pending(-1, -1, 0.0))
        return delay

    def _remove_empty_folders(self) -> None:
        keep = self.settings.empty_folder_seconds
        for dirpath, _dirnames, _filenames in os.walk(self.root, topdown=False):
            folder = Path(dirpath)
            if folder == self.root:
                continue
            try:
                if time.time() - folder.lstat().st_mtime >= keep:
                    folder.rmdir()  # only succeeds when empty
            except OSError:
                pass
