"""Ingest throughput: DCMTK ``storescu`` into DCMTK ``storescp --fork`` and ``dicomnode serve``.

Every receiver gets the same generated CT instances, sent with DCMTK ``storescu``
(``TCP_NODELAY=1``) over loopback, once with one association and once with four concurrent
associations (four ``storescu`` processes, a quarter each). For every run it reports instances
per second, the receiver's CPU milliseconds per instance and the rate as a multiple of
``storescp`` in the same run.

CPU is read from process accounting (``/proc/<pid>/stat``): utime + stime of every process in the
receiver's process group, plus cutime + cstime (children that exited and were reaped, which is how
``storescp --fork`` children are counted), sampled when the receiver is idle just before and just
after the send. Each run starts a fresh receiver with empty storage; after a dicomnode run every
instance must be in the index and on disk (a durable, indexed rate), after a ``storescp`` run every
instance must be in its output folder.

Usage::

    python -m benchmarks.ingest [--count N] [--processes P] [--rounds R]

This is a measurement, not a test: figures depend on the machine and on what else runs on it,
which is why the reference receiver runs in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from benchmarks._common import BenchmarkError, dcmtk_tool, free_port, machine, stop, wait_port
from tests.dicomgen import make_series, write_series

__all__ = ["RunResult", "main"]

REPO = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_LISTENING = re.compile(r"listening on [^ ]+:(\d+) ")
_AE = "BENCHSCU"


@dataclass(frozen=True)
class RunResult:
    """One send of all instances to one receiver."""

    receiver: str
    associations: int
    instances: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        """Instances per second."""
        return self.instances / self.seconds

    @property
    def cpu_ms_per_instance(self) -> float:
        return 1000.0 * self.cpu_seconds / self.instances


# --- tools and process accounting ---------------------------------------------------------


def _group_cpu(pgid: int) -> tuple[int, int]:
    """(CPU clock ticks, live processes) of a process group, counting reaped children."""
    ticks = 0
    live = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        # fields[0] is field 3 of proc(5): state; pgrp is field 5, utime..cstime 14..17.
        if int(fields[2]) != pgid:
            continue
        ticks += sum(int(v) for v in fields[11:15])
        if fields[0] != b"Z":
            live += 1
    return ticks, live


def _settled_cpu(pgid: int, max_live: int, timeout: float = 20.0) -> float:
    """CPU seconds of a process group once it is idle: at most ``max_live`` processes alive and
    two readings 0.2 s apart agree (a zombie being reaped moves its time to its parent)."""
    deadline = time.monotonic() + timeout
    previous: int | None = None
    while True:
        ticks, live = _group_cpu(pgid)
        if (live <= max_live and ticks == previous) or time.monotonic() > deadline:
            return ticks / _CLK_TCK
        previous = ticks
        time.sleep(0.2)


# --- receivers ------------------------------------------------------------------------------


class _Receiver:
    """A receiver started in its own process group, with its own folder."""

    name = ""
    ae_title = ""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.max_live = 1

    @property
    def pgid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        raise NotImplementedError

    def verify(self, sop_uids: set[str]) -> None:
        """Raise BenchmarkError unless every instance was kept."""
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def _spawn(
        self, cmd: list[str], log_name: str, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in a session of its own (TCP_NODELAY on for DCMTK and Orthanc), its
        output in ``log_name`` in the receiver's folder."""
        with (self.folder / log_name).open("wb") as log:
            return subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env={**os.environ, "TCP_NODELAY": "1"},
                start_new_session=True,
            )


class _StoreSCP(_Receiver):
    name = "DCMTK storescp --fork"
    ae_title = "STORESCP"

    def start(self) -> None:
        out = self.folder / "out"
        out.mkdir(parents=True)
        self.port = free_port()
        # storescp 3.6.7 cannot bind to one address; it is reached only on 127.0.0.1 here.
        # DCMTK sets TCP_NODELAY on its sockets only when told so by the environment (on both
        # ends; with Nagle on, storescp answers ~20 instances/s).
        cmd = [dcmtk_tool("storescp"), "--fork", "-dhl", "-aet", self.ae_title]
        cmd += ["-od", str(out), str(self.port)]
        self.proc = self._spawn(cmd, "storescp.log")
        wait_port(self.port, self.proc)

    def verify(self, sop_uids: set[str]) -> None:
        kept = sum(1 for p in (self.folder / "out").iterdir() if p.is_file())
        if kept != len(sop_uids):
            raise BenchmarkError(f"storescp kept {kept} of {len(sop_uids)} instances")


class _Orthanc(_Receiver):
    """Orthanc (Debian package) with its own config, storage and ports: a real PACS for scale."""

    name = "Orthanc"
    ae_title = "ORTHANC"

    def start(self) -> None:
        exe = shutil.which("Orthanc")
        if exe is None:
            raise BenchmarkError("Orthanc not found: install the orthanc package")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port, self.http_port = free_port(), free_port()
        config = {
            "Name": "dicomnode-benchmark",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "StorageCompression": False,
            "Plugins": [],
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config), encoding="utf-8")
        # Orthanc 1.10 cannot bind to one address; it is only ever sent to on 127.0.0.1.
        self.proc = self._spawn([exe, str(path)], "orthanc.log")
        wait_port(self.port, self.proc)
        wait_port(self.http_port, self.proc)

    def verify(self, sop_uids: set[str]) -> None:
        url = f"http://127.0.0.1:{self.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=30) as response:
            count = int(json.loads(response.read())["CountInstances"])
        if count != len(sop_uids):
            raise BenchmarkError(f"Orthanc kept {count} of {len(sop_uids)} instances")


class _DicomNode(_Receiver):
    ae_title = "DICOMNODE"

    def __init__(self, folder: Path, processes: int) -> None:
        super().__init__(folder)
        self.processes = processes
        self.name = f"dicomnode serve, {processes} process{'es' if processes > 1 else ''}"
        # With several processes the main process only watches and settles; children serve.
        self.max_live = 1 + (processes if processes > 1 else 0)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "node": {
                "ae_title": self.ae_title,
                "host": "127.0.0.1",
                "port": 0,
                "processes": self.processes,
            },
            "storage": {"root": "storage"},
            "database": {"url": "sqlite:///index.db"},
            "completion": {"settle_seconds": 5, "force_seconds": 3600},
            "logging": {"level": "INFO"},
        }
        config_path = self.folder / "dicomnode.yaml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        log_path = self.folder / "node.log"
        self.proc = self._spawn(
            [sys.executable, "-m", "dicomnode", "serve", "--config", str(config_path)],
            log_path.name,
            cwd=REPO,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchmarkError(f"dicomnode serve exited:\n{log_path.read_text()[-2000:]}")
            m = _LISTENING.search(log_path.read_text(encoding="utf-8", errors="replace"))
            if m:
                self.port = int(m.group(1))
                return
            time.sleep(0.05)
        raise BenchmarkError("dicomnode serve did not start listening within 60 s")

    def verify(self, sop_uids: set[str]) -> None:
        uri = f"file:{self.folder / 'index.db'}?mode=ro"
        with sqlite3.connect(uri, uri=True) as db:
            rows = db.execute("SELECT sop_instance_uid, path FROM instances").fetchall()
        db.close()
        indexed = {uid: path for uid, path in rows}
        missing = sop_uids - indexed.keys()
        if missing:
            raise BenchmarkError(f"{len(missing)} of {len(sop_uids)} instances are not indexed")
        absent = [u for u in sop_uids if not (self.folder / "storage" / indexed[u]).is_file()]
        if absent:
            raise BenchmarkError(f"{len(absent)} indexed instances have no file")


# --- sending --------------------------------------------------------------------------------


def _send(receiver: _Receiver, files: list[Path], associations: int, logs: Path) -> float:
    """Send ``files`` split over ``associations`` concurrent storescu processes; seconds taken."""
    exe = dcmtk_tool("storescu")
    env = {**os.environ, "TCP_NODELAY": "1"}
    size = -(-len(files) // associations)
    parts = [files[i : i + size] for i in range(0, len(files), size)]
    procs = []
    outputs = []
    started = time.monotonic()
    for i, part in enumerate(parts):
        out = (logs / f"storescu-{associations}-{i}.log").open("wb")
        outputs.append(out)
        cmd = [exe, "-aet", _AE, "-aec", receiver.ae_title, "127.0.0.1", str(receiver.port)]
        cmd += [str(p) for p in part]
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))
    codes = [p.wait() for p in procs]
    seconds = time.monotonic() - started
    for out in outputs:
        out.close()
    if any(codes):
        raise BenchmarkError(f"storescu exit codes {codes}; see {logs}")
    return seconds


def _empty(folder: Path) -> None:
    """Empty every file a run left (its space and page cache are freed) but keep the files:
    a deleted file would slow the next run (on ext4 without a journal, creating a file scans
    past every inode freed in the last minutes), and so would keeping the data (each run's
    265 MB more in the page cache made storescp alone 3-4x slower per instance by the sixth
    run here). Everything is deleted at the end."""
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.truncate(path, 0)


def _run(
    make: type[_Receiver] | tuple[type[_DicomNode], int],
    folder: Path,
    files: list[Path],
    sop_uids: set[str],
    associations: int,
) -> RunResult:
    receiver = make[0](folder, make[1]) if isinstance(make, tuple) else make(folder)
    try:
        receiver.start()
        before = _settled_cpu(receiver.pgid, receiver.max_live)
        seconds = _send(receiver, files, associations, folder)
        after = _settled_cpu(receiver.pgid, receiver.max_live)
        receiver.verify(sop_uids)
    finally:
        receiver.stop()
    return RunResult(receiver.name, associations, len(files), seconds, after - before)


# --- report ---------------------------------------------------------------------------------


def _median(results: list[RunResult]) -> RunResult:
    first = results[0]
    return RunResult(
        first.receiver,
        first.associations,
        first.instances,
        statistics.median(r.seconds for r in results),
        statistics.median(r.cpu_seconds for r in results),
    )


def table(results: Sequence[RunResult]) -> str:
    """A Markdown table; ratios are to storescp (and Orthanc, when it ran) with the same number
    of associations."""
    storescp = {r.associations: r.rate for r in results if r.receiver.startswith("DCMTK")}
    orthanc = {r.associations: r.rate for r in results if r.receiver == "Orthanc"}
    head = "| receiver | associations | instances/s | CPU ms/instance | x storescp |"
    rule = "|---|---:|---:|---:|---:|"
    if orthanc:
        head += " x Orthanc |"
        rule += "---:|"
    lines = [head, rule]
    for r in results:
        row = (
            f"| {r.receiver} | {r.associations} | {r.rate:.0f} | {r.cpu_ms_per_instance:.2f} | "
            f"{r.rate / storescp.get(r.associations, r.rate):.2f} |"
        )
        if orthanc:
            row += f" {r.rate / orthanc.get(r.associations, r.rate):.2f} |"
        lines.append(row)
    return "\n".join(lines)


def round_ratios(collected: dict[tuple[int, int], list[RunResult]]) -> list[str]:
    """Per receiver and association count, the ratio to storescp within each round (the
    machine's speed moves between rounds; within one round the receivers ran minutes apart)."""
    lines = []
    for (i, associations), runs in sorted(collected.items()):
        reference = collected.get((0, associations))
        if i == 0 or reference is None:
            continue
        ratios = [r.rate / ref.rate for r, ref in zip(runs, reference, strict=True)]
        lines.append(
            f"{runs[0].receiver}, {associations} association(s): x storescp by round "
            + ", ".join(f"{x:.2f}" for x in ratios)
            + f" (median {statistics.median(ratios):.2f}, lowest {min(ratios):.2f})"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__)
    parser.add_argument("--count", type=int, default=500, help="instances (512x512 CT)")
    parser.add_argument(
        "--processes", type=int, default=2, help="serving processes of the multi-process node"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="repeat every run; medians are reported"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder and print it")
    parser.add_argument("--no-orthanc", action="store_true", help="leave Orthanc out")
    args = parser.parse_args(argv)
    if args.count < 4 or args.processes < 2 or args.rounds < 1:
        parser.error("need --count >= 4, --processes >= 2, --rounds >= 1")

    work = Path(tempfile.mkdtemp(prefix="dicomnode-bench-"))
    try:
        print(f"generating {args.count} 512x512 CT instances ...", file=sys.stderr)
        datasets = make_series(args.count, rows=512, columns=512, modality="CT")
        files = write_series(work / "ct", datasets)
        sop_uids = {str(ds.SOPInstanceUID) for ds in datasets}
        del datasets
        mb = sum(p.stat().st_size for p in files) / len(files) / 1e6
        receivers: list[type[_Receiver] | tuple[type[_DicomNode], int]] = [
            _StoreSCP,
            (_DicomNode, 1),
            (_DicomNode, args.processes),
        ]
        if not args.no_orthanc:
            receivers.append(_Orthanc)
        collected: dict[tuple[int, int], list[RunResult]] = {}
        for rnd in range(args.rounds):
            for i, make in enumerate(receivers):
                for associations in (1, 4):
                    folder = work / f"r{rnd}-{i}-{associations}"
                    # Every run starts with no write-back of earlier runs pending; their files
                    # are emptied, not deleted (see _empty).
                    os.sync()
                    result = _run(make, folder, files, sop_uids, associations)
                    collected.setdefault((i, associations), []).append(result)
                    if not args.keep:
                        _empty(folder)
                    print(
                        f"round {rnd + 1}: {result.receiver}, {associations} association(s): "
                        f"{result.rate:.0f}/s, {result.cpu_ms_per_instance:.2f} ms CPU/instance",
                        file=sys.stderr,
                    )
        results = [_median(collected[key]) for key in sorted(collected)]
    finally:
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
            os.sync()

    print(f"date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}")
    print(f"machine: {machine()}")
    print(
        f"command: python -m benchmarks.ingest --count {args.count} "
        f"--processes {args.processes} --rounds {args.rounds}"
    )
    print(f"instances: {args.count} x {mb:.2f} MB CT; medians of {args.rounds} round(s)")
    print()
    print(table(results))
    print()
    for line in round_ratios(collected):
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
