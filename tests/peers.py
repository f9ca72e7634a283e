"""Real DICOM peers for tests: DCMTK storescp on a free loopback port, stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pydicom

from tests.conftest import REPO, require_tool, wait_for

__all__ = ["Orthanc", "StoreSCP", "Worker", "free_port", "received"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class StoreSCP:
    """DCMTK storescp writing what it receives into ``folder``; ``args`` are added to its
    command line (e.g. ``+tls KEY CERT``)."""

    def __init__(
        self,
        folder: Path,
        ae_title: str = "DEST",
        port: int | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = port or free_port()
        self.args = list(args or [])
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> StoreSCP:
        exe = require_tool("storescp")
        log = (self.folder.parent / f"{self.ae_title}.log").open("wb")
        self.proc = subprocess.Popen(
            [
                exe,
                "-aet",
                self.ae_title,
                "-od",
                str(self.folder),
                "--accept-all",
                "-v",
                *self.args,
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

        def listening() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, "storescp exited"
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, 10, what=f"storescp on {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())


def received(folder: Path) -> dict[str, bytes]:
    """SOP Instance UID -> the dataset bytes (after the file meta) of every file in a folder."""
    out = {}
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        data = path.read_bytes()
        out[str(ds.SOPInstanceUID)] = data[_dataset_offset(data) :]
    return out


def _dataset_offset(data: bytes) -> int:
    """Where the dataset starts after preamble, DICM and the group 0002 elements."""
    assert data[128:132] == b"DICM"
    group_length = int.from_bytes(data[140:144], "little")
    return 144 + group_length


class Orthanc:
    """A real Orthanc PACS with its own config, storage and ports; stopped by PID.

    Orthanc 1.10 cannot bind to one address, so it gets unused ports and tests only ever
    reach it on 127.0.0.1; its HTTP API refuses remote access.
    """

    def __init__(self, folder: Path, ae_title: str = "ORTHANC") -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> Orthanc:
        import json

        exe = require_tool("Orthanc")
        config = {
            "Name": "dicomnode-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "UnknownSopClassAccepted": True,
            "Plugins": [],
            "StorageCompression": False,
            "OverwriteInstances": True,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        log = (self.folder / "orthanc.log").open("wb")
        self.proc = subprocess.Popen([exe, str(path)], stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def ready() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, (self.folder / "orthanc.log").read_text()
            try:
                self.api("/system")
            except OSError:
                return False
            return True

        wait_for(ready, 30, what="Orthanc to start")
        return self

    def api(self, path: str) -> bytes:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            data: bytes = r.read()
            return data

    def instances(self) -> dict[str, bytes]:
        """SOP Instance UID -> dataset bytes of every instance Orthanc holds."""
        import io
        import json

        out = {}
        for oid in json.loads(self.api("/instances")):
            data = self.api(f"/instances/{oid}/file")
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            out[str(ds.SOPInstanceUID)] = data[_dataset_offset(data) :]
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        self.proc = None


class Worker:
    """A ``dicomnode worker`` subprocess in its own process group, stopped by PID."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log_path = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicomnode", "worker", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )

        def ready() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, self.log()
            return "worker ready" in self.log()

        wait_for(ready, 30, what="the worker to start")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9 the worker's process group."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None
