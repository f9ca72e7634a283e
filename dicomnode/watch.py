"""Watched drop folders: files are taken when completely written and go through the same
ingest path as the SCP; a source file is removed only after it is stored or quarantined.

Readiness, for a file whose content is structurally whole (``dicomnode.partial``: nothing
runs past the end, and an image has its pixel data):

- while another process has it open for writing (a read lease cannot be taken on it, or,
  where leases are not available, inotify saw it written and not yet closed), it is not
  taken; it is taken after its writer closes it (close-after-write event), or once it is
  unchanged for ``abandoned_seconds`` (default max(300 s, 10 x ``stable_seconds``)) although
  still open, with a warning;
- otherwise once it is closed by its writer, or its size and mtime are unchanged for
  ``stable_seconds`` (writers inotify cannot see: network file systems, files dropped while
  the node was down, renamed into place).

A file that looks unfinished (cut short, shorter than a header, an image without its pixel
data) is waited for even after its writer closed it, since writers that append through
several opens (``cat part >> f``, resumed transfers) close it in between: it is taken as it is
(quarantined when certainly truncated, otherwise judged by the ingest path) only once it is
unchanged for ``unfinished_seconds`` (default max(30 s, 3 x ``stable_seconds``)) and no
longer open for writing, or for ``abandoned_seconds`` when that cannot be told.

Before a source is removed its size, mtime and inode must still be those of the content
stored, and no other process may have it open for writing (unless it was taken as
abandoned). A periodic rescan picks up files dropped while the node was down and any event
the kernel dropped. Symbolic links, special files, hidden names and the temporary names of
writers that rename into place (``x.tmp``, ``x.part``) are never taken.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import signal
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
# Read-only (a read lease needs it), never through a link, never blocking on a FIFO.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    since: float  # monotonic time of the last change seen
    due: float  # monotonic time of the next look at it
    closed: bool = False  # its writer closed it (close-after-write) since the last change
    written: bool = False  # inotify saw it written, and no close-after-write since


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
        if event.event_type in ("created", "moved"):
            self.watcher.notice(Path(os.fsdecode(path)))
        elif event.event_type == "modified":
            self.watcher.notice(Path(os.fsdecode(path)), written=True)
        elif event.event_type == "closed":
            self.watcher.notice(Path(os.fsdecode(path)), closed=True)


class FolderWatcher:
    """Ingests every file dropped under one folder."""

    def __init__(self, settings: WatchFolder, ingestor: Ingestor) -> None:
        self.settings = settings
        self.root = settings.path.resolve()
        self.ingestor = ingestor
        self.source = Source(kind="folder", folder=str(self.root))
        self.unfinished_seconds = settings.unfinished_wait
        self.abandoned_seconds = settings.abandoned_wait
        self._pending: dict[Path, _Pending] = {}
        self._failures: dict[Path, tuple[int, float]] = {}
        self._warned: set[Path] = set()
        self._lease_signal: int | None = None  # set by start(); None: no leases taken
        self._no_lease: set[int] = set()  # errnos already reported
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
        self._lease_signal = _lease_signal()
        if self._lease_signal is None:
            logger.info(
                "cannot tell whether files in %s are still open by their writers (SIGURG and "
                "SIGWINCH are both handled in this process, and SIGIO would stop it); files "
                "are taken on close events and stable sizes",
                self.root,
            )
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

    def notice(self, path: Path, *, written: bool = False, closed: bool = False) -> None:
        """Remember a file that may be ready; ``written`` means inotify saw it written,
        ``closed`` that its writer closed it after writing."""
        st = self._acceptable(path)
        if st is None:
            return
        now = time.monotonic()
        with self._lock:
            entry = self._pending.get(path)
            if entry is None or (entry.size, entry.mtime_ns) != (st.st_size, st.st_mtime_ns):
                entry = self._changed(path, st.st_size, st.st_mtime_ns, now)
            if written:
                entry.written, entry.closed = True, False
            if closed:
                entry.written, entry.closed = False, True
                entry.due = now
        self._wake.set()

    def _changed(self, path: Path, size: int, mtime_ns: int, now: float) -> _Pending:
        """A new entry for a file seen (again) at this size and mtime; the caller holds
        the lock."""
        old = self._pending.get(path)
        entry = _Pending(
            size,
            mtime_ns,
            now,
            now + self.settings.stable_seconds,
            written=bool(old and old.written),
        )
        self._pending[path] = entry
        return entry

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
                due = min([next_scan, *(e.due for e in self._pending.values())])
            self._wake.wait(min(max(0.02, due - time.monotonic()), self.settings.poll_seconds))
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
        """The files due for a look, each unchanged since it was last seen."""
        now = time.monotonic()
        ready: list[tuple[Path, _Pending]] = []
        with self._lock:
            for path, entry in list(self._pending.items()):
                if now < entry.due:
                    continue
                failed = self._failures.get(path)
                if failed is not None and now < failed[1]:
                    entry.due = failed[1]
                    continue
                try:
                    st = path.lstat()
                except OSError:  # gone; a rescan finds it again if it is back
                    del self._pending[path]
                    continue
                if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
                    self._changed(path, st.st_size, st.st_mtime_ns, now)
                    continue
                entry.due = math.inf  # until _take has decided
                ready.append((path, entry))
        return sorted(ready, key=lambda item: item[0])

    def _take(self, path: Path, entry: _Pending) -> None:
        """Store or quarantine one file, then remove it; leave it in place on any failure,
        and while it may still be written."""
        now = time.monotonic()
        quiet = now - entry.since
        abandoned = quiet >= self.abandoned_seconds
        size, mtime = entry.size, entry.mtime_ns
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            self._done(path, entry)
            return
        except OSError as exc:
            logger.warning("cannot open %s (%s); left in place", path, exc)
            self._retry_later(path)
            return
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                self._done(path, entry)  # replaced since it was listed; the rescan judges it
                return
            writer = self._writer_has_it(fd, path)
            held = entry.written if writer is None else writer
            if held and not abandoned:
                # Taking it now would lose whatever its writer adds later.
                logger.debug("%s is still open for writing; waiting for it to be closed", path)
                poll = now + self.settings.poll_seconds
                self._wait(path, entry, min(poll, entry.since + self.abandoned_seconds))
                return
            content = _read(fd)
        except OSError as exc:
            logger.warning("cannot read %s (%s); left in place", path, exc)
            self._retry_later(path)
            return
        finally:
            os.close(fd)
        if content is None or (content[1].size, content[1].mtime_ns) != (size, mtime):
            # Changed since it was last seen, or while it was read: start over.
            self.notice(path)
            self._wait(path, entry, time.monotonic() + self.settings.stable_seconds)
            return
        data, snapshot = content
        why = unfinished(data)
        if why is not None and not abandoned:
            # Its writer may be one that closes and reopens it between appends. Once it is
            # known to be closed, wait unfinished_seconds for more; if that cannot be told,
            # as long as for a writer that keeps it open.
            closed = entry.closed or writer is False
            limit = self.unfinished_seconds if closed else self.abandoned_seconds
            if quiet < limit:
                logger.debug("%s is not complete yet (%s); waiting", path, why.reason)
                self._wait(path, entry, entry.since + limit)
                return
        if held:
            logger.warning(
                "%s is still open for writing by another process, but unchanged for %.0f s: "
                "taking it as it is",
                path,
                quiet,
            )
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
        if self._remove_source(path, snapshot, abandoned=abandoned):
            self._done(path, entry)
        else:
            self._wait(path, entry, time.monotonic() + self.settings.poll_seconds)

    def _wait(self, path: Path, entry: _Pending, until: float) -> None:
        """Look at ``path`` again at ``until`` (monotonic), or sooner if an event says so."""
        with self._lock:
            if self._pending.get(path) is entry:
                entry.due = until if entry.due == math.inf else min(entry.due, until)

    def _done(self, path: Path, entry: _Pending) -> None:
        """Forget ``path``, unless an event about it came while it was being taken."""
        with self._lock:
            if self._pending.get(path) is entry and entry.due == math.inf:
                del self._pending[path]

    def _writer_has_it(self, fd: int, path: Path) -> bool | None:
        """Whether another process has the file behind ``fd`` (opened read-only) open for
        writing; None when that cannot be told here.

        A read lease cannot be taken while anyone has the file open for writing; one that
        can is released at once. Leases need the file's owner (or CAP_LEASE) and a local file
        system that supports them.
        """
        if self._lease_signal is None:
            return None
        try:
            fcntl.fcntl(fd, fcntl.F_SETSIG, self._lease_signal)
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:
            code = exc.errno or 0
            if code in (errno.EAGAIN, errno.EBUSY):
                return True
            if code not in self._no_lease:
                self._no_lease.add(code)
                logger.info(
                    "cannot tell whether %s is still open by its writer (%s); files like it "
                    "are taken on close events and stable sizes. %s",
                    path,
                    exc.strerror,
                    _NO_LEASE_HINTS.get(code, ""),
                )
            return None
        with contextlib.suppress(OSError):  # closing the descriptor releases it anyway
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False

    def _remove_source(self, path: Path, stored: _Snapshot, *, abandoned: bool) -> bool:
        """Remove the source, unless it was changed or replaced after it was read or
        (unless it was taken as ``abandoned``) another process opened it for writing
        since; True when it is gone."""
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            return True
        except OSError as exc:
            logger.warning("cannot check %s before removing it (%s); left in place", path, exc)
            return False
        try:
            st = os.fstat(fd)
            same = _Snapshot(st.st_size, st.st_mtime_ns, st.st_ino) == stored
            writer = same and not abandoned and self._writer_has_it(fd, path)
        finally:
            os.close(fd)
        if not same:
            logger.warning("%s changed while it was being stored; taking it again", path)
            self.notice(path)
            return False
        if writer:
            logger.warning(
                "%s was opened for writing while it was being stored; left in place until "
                "its writer is done",
                path,
            )
            return False
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return True

    def _retry_later(self, path: Path) -> float:
        """Back off before the next attempt at ``path``; returns the delay in seconds."""
        attempts = self._failures.get(path, (0, 0.0))[0] + 1
        delay = min(60.0, 2.0**attempts)
        now = time.monotonic()
        with self._lock:
            self._failures[path] = (attempts, now + delay)
            entry = self._pending.get(path)
            if entry is None:
                # Size unknown: the next look starts over, as for a file seen the first time.
                self._pending[path] = _Pending(-1, -1, now, now + delay)
            else:
                entry.due = now + delay
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


_NO_LEASE_HINTS = {
    errno.EACCES: "Leases need the file's owner: run the node as the user who writes the "
    "files, or give it CAP_LEASE.",
    errno.EINVAL: "The file system does not support leases (or fs.leases-enable is 0).",
}


def _read(fd: int) -> tuple[bytes, _Snapshot] | None:
    """The content behind ``fd`` and its identity, or None if it changed while being read."""
    before = os.fstat(fd)
    chunks = []
    while chunk := os.read(fd, 1 << 22):
        chunks.append(chunk)
    data = b"".join(chunks)
    after = os.fstat(fd)
    snapshot = _Snapshot(after.st_size, after.st_mtime_ns, after.st_ino)
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        return None
    if len(data) != snapshot.size:
        return None
    return data, snapshot


def _lease_signal() -> int | None:
    """The signal to ask for when one of our leases is broken, or None if there is none to
    spare. The kernel signals a lease holder when another process opens the file for
    writing; the default, SIGIO, would stop the process. A signal whose default action is to
    ignore it is used instead, one that nothing in this process handles."""
    for signum in (signal.SIGURG, signal.SIGWINCH):
        if signal.getsignal(signum) in (signal.SIG_DFL, signal.SIG_IGN):
            return signum
    return None
