"""Watched drop folders: files are taken when completely written and go through the same
ingest path as the SCP; a source file is removed only after it is stored or quarantined.

Readiness: a close-after-write event (inotify) or a size and mtime unchanged for
``stable_seconds``. A periodic rescan picks up files dropped while the node was down and any
event the kernel dropped. Symbolic links are never followed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from dicomnode.errors import QuarantinedError, StorageError
from dicomnode.ingest import Ingestor, Source
from dicomnode.settings import WatchFolder

__all__ = ["FolderWatcher"]

logger = logging.getLogger(__name__)

_DICOMDIR_REASON = (
    "DICOMDIR media index, not an instance; the files it lists are ingested on their own"
)


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    since: float
    closed: bool = False


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
        if not self._acceptable(path):
            return
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        with self._lock:
            entry = self._pending.get(path)
            if entry is None or (entry.size, entry.mtime_ns) != (st.st_size, st.st_mtime_ns):
                entry = _Pending(st.st_size, st.st_mtime_ns, time.monotonic())
                self._pending[path] = entry
            if closed:
                entry.closed = True
        self._wake.set()

    def _acceptable(self, path: Path) -> bool:
        """Inside the folder, a regular file (not a link), not a hidden partial write."""
        if path.name.startswith("."):
            return False
        try:
            path.relative_to(self.root)
        except ValueError:
            return False
        if not self.settings.recursive and path.parent != self.root:
            return False
        if path.is_symlink():
            if path not in self._warned:
                logger.warning("not following symbolic link %s in a watched folder", path)
                self._warned.add(path)
            return False
        return True

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
            for path in self._ready():
                if self._stop.is_set():
                    return
                self._take(path)
            self._wake.wait(0.1 if self._pending else self.settings.poll_seconds)
            self._wake.clear()

    def _scan(self) -> None:
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            base = Path(dirpath)
            if not self.settings.recursive:
                dirnames.clear()
            for name in filenames:
                self.notice(base / name)
        self._remove_empty_folders()

    def _ready(self) -> list[Path]:
        now = time.monotonic()
        ready: list[Path] = []
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
                if entry.closed or now - entry.since >= self.settings.stable_seconds:
                    ready.append(path)
                    del self._pending[path]
        return sorted(ready)

    def _take(self, path: Path) -> None:
        try:
            if path.name.upper() == "DICOMDIR":
                self.ingestor.quarantine_file(path, _DICOMDIR_REASON, self.source)
            else:
                self.ingestor.ingest_file(path, self.source)
                self.stored += 1
        except FileNotFoundError:
            return
        except QuarantinedError:
            self.quarantined += 1
        except (StorageError, OSError):
            attempts = self._failures.get(path, (0, 0.0))[0] + 1
            delay = min(60.0, 2.0**attempts)
            self._failures[path] = (attempts, time.monotonic() + delay)
            logger.exception("could not store %s; left in place, retry in %.0f s", path, delay)
            with self._lock:
                self._pending.setdefault(path, _Pending(-1, -1, 0.0))
            return
        self._failures.pop(path, None)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def _remove_empty_folders(self) -> None:
        for dirpath, _dirnames, _filenames in os.walk(self.root, topdown=False):
            folder = Path(dirpath)
            if folder == self.root or folder.is_symlink():
                continue
            try:
                if time.time() - folder.stat().st_mtime > 2 * self.settings.poll_seconds:
                    folder.rmdir()  # only succeeds when empty
            except OSError:
                pass
