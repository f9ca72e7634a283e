"""The node's lifecycle: start the SCP (one or several processes), watchers and the
completion monitor; stop cleanly on SIGTERM/SIGINT; tell systemd when ready."""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from types import FrameType

from sqlalchemy import Engine

from dicomnode.completion import CompletionMonitor
from dicomnode.ingest import Ingestor
from dicomnode.scp import AssociationLoad, StoreSCP, listening_socket
from dicomnode.settings import NodeSettings, Settings
from dicomnode.watch import FolderWatcher
from runners.dispatch import Dispatcher
from storage.db import make_engine, upgrade_schema
from storage.filestore import FileStore

__all__ = ["Node", "open_to_any_caller", "sd_notify", "wait_interruptibly"]

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def sd_notify(message: str) -> None:
    """Send a state line to systemd when run as a Type=notify service."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            logger.warning("could not notify systemd at %s", address)


def wait_interruptibly(event: threading.Event) -> None:
    """Wait for ``event`` in the main thread so that signal handlers still run.

    A signal delivered to another thread does not interrupt a lock wait of the main thread,
    so an untimed ``Event.wait()`` could keep SIGTERM from ever being handled.
    """
    while not event.wait(0.5):
        pass


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        logger.warning("cannot ask the kernel to stop this process with its parent")


class Node:
    """One running node: ``start()``, then ``wait()``; ``stop()`` from any thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = FileStore(
            settings.storage.root, settings.storage.quarantine_dir, fsync=settings.storage.fsync
        )
        self.engine: Engine | None = None
        self.scp: StoreSCP | None = None
        self.monitor: CompletionMonitor | None = None
        self.dispatcher: Dispatcher | None = None
        self.watchers: list[FolderWatcher] = []
        self.port = 0
        self._children: list[int] = []
        self._stopped = threading.Event()
        self.failure: str | None = None  # why the node stopped by itself, if it did
        self._scp_thread: threading.Thread | None = None

    def _new_ingestor(self, engine: Engine) -> Ingestor:
        return Ingestor(
            engine, self.store, log_identifiers=self.settings.logging.patient_identifiers
        )

    def start(self) -> None:
        s = self.settings
        self.store.prepare()
        engine = make_engine(s.database.url)
        upgrade_schema(engine)
        self._new_ingestor(engine).warm_up()
        engine.dispose()  # no pooled connection may cross a fork
        sock = listening_socket(s.node.host, s.node.port)
        self.port = sock.getsockname()[1]
        load = AssociationLoad(s.node.processes)
        if s.node.processes > 1:
            for slot in range(s.node.processes):
                self._fork_server(sock, load, slot, engine)
        self.engine = engine
        if s.node.processes == 1:
            self.scp = StoreSCP(s.node, self._new_ingestor(self.engine), sock, load=load)
            self._scp_thread = threading.Thread(
                target=self.scp.serve_forever, name="scp", daemon=True
            )
            self._scp_thread.start()
        ingestor = self._new_ingestor(self.engine)
        for folder in s.watch:
            watcher = FolderWatcher(folder, ingestor)
            watcher.start()
            self.watchers.append(watcher)
        self.dispatcher = Dispatcher(self.engine, s)
        self.dispatcher.start()
        self.monitor = CompletionMonitor(self.engine, s.completion, self.dispatcher.on_complete)
        self.monitor.start()
        logger.info(
            "dicomnode %s listening on %s:%d (%d process%s); storage %s; index %s",
            s.node.ae_title,
            s.node.host,
            self.port,
            s.node.processes,
            "" if s.node.processes == 1 else "es",
            s.storage.root,
            _redact(s.database.url),
        )
        open_warning = open_to_any_caller(s.node)
        if open_warning is not None:
            logger.warning("%s", open_warning)
        sd_notify("READY=1\nSTATUS=receiving")

    def _fork_server(
        self, sock: socket.socket, load: AssociationLoad, slot: int, engine: Engine
    ) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            self._children.append(pid)
            return
        # Child: serve the shared socket until told to stop or the parent dies.
        code = 0
        try:
            _die_with_parent()
            # The parent's engine, warmed up, with a pool of this process's own.
            engine.dispose(close=False)
            load.slot = slot
            scp = StoreSCP(self.settings.node, self._new_ingestor(engine), sock, load=load)
            done = threading.Event()

            def _stop(_signum: int, _frame: FrameType | None) -> None:
                done.set()

            signal.signal(signal.SIGTERM, _stop)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            thread = threading.Thread(target=scp.serve_forever, name="scp", daemon=True)
            thread.start()
            wait_interruptibly(done)
            scp.shutdown()
        except BaseException:
            logger.exception("serving process failed")
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    def wait(self) -> None:
        """Block until ``stop()`` is called (for example by a signal handler), or until a
        serving process ends by itself: then the node stops with ``failure`` set, so that the
        service manager restarts it rather than leave connections waiting on a socket that
        fewer processes serve (or none)."""
        while not self._stopped.wait(0.5):
            ended = self._ended_child()
            if ended is not None and not self._stopped.is_set():
                self.failure = f"serving process {ended[0]} ended ({ended[1]})"
                logger.error("%s; stopping the node", self.failure)
                self.stop()

    def _ended_child(self) -> tuple[int, str] | None:
        for pid in self._children:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return pid, "not found"
            if done:
                self._children.remove(pid)
                if os.WIFSIGNALED(status):
                    return pid, f"killed by signal {os.WTERMSIG(status)}"
                return pid, f"exit code {os.waitstatus_to_exitcode(status)}"
        return None

    def install_signal_handlers(self) -> None:
        def _handler(signum: int, _frame: FrameType | None) -> None:
            logger.info("signal %d: stopping", signum)
            threading.Thread(target=self.stop, name="stop").start()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        sd_notify("STOPPING=1")
        for watcher in self.watchers:
            watcher.stop()
        if self.scp is not None:
            self.scp.shutdown()
        for pid in self._children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in self._children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        if self.monitor is not None:
            self.monitor.stop()
        if self.dispatcher is not None:
            self.dispatcher.stop()
        if self.engine is not None:
            self.engine.dispose()
        logger.info("dicomnode stopped")
        self._stopped.set()


def open_to_any_caller(node: NodeSettings) -> str | None:
    """The warning for a listener any host can reach that admits any calling AE title; None
    when ``allowed_calling_aes`` restricts callers or only this host can connect (loopback)."""
    if node.allowed_calling_aes:
        return None
    host = node.host.strip("[]")
    if host == "localhost":
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a host name: whoever reaches the address it resolves to
        where = host
    else:
        if address.is_loopback:
            return None
        where = "all interfaces" if address.is_unspecified else host
    return (
        f"accepting associations from any calling AE on {where}; "
        "set node.allowed_calling_aes to restrict"
    )


def _redact(url: str) -> str:
    """A database URL without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url
