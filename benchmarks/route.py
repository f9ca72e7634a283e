"""Route latency and forward throughput: ``storescu`` -> ``dicomnode serve`` -> DCMTK ``storescp``.

A generated CT series (512x512 slices) is sent with DCMTK ``storescu`` (``TCP_NODELAY=1``) over
loopback to ``dicomnode serve``, whose only rule forwards everything to a DCMTK ``storescp``
destination. The latency measured is from the moment the sender has its last instance
acknowledged (``storescu`` exits) to the moment every instance lies complete in the
destination's folder; the overhead is that latency minus ``settle_seconds`` (the quiet period
the node waits on purpose). The node's log timestamps split it into: until the study is
complete, completion to the first instance at the destination (routing, job, queue,
association), and the delivery itself.

In the same run, a plain ``storescu -> storescp`` copy of the same files is the reference for
the delivery throughput; both rates are measured the same way, at the receiving folder: from the
first instance appearing to the last one complete, (count - 1) intervals over that time.

A file counts as complete when its size is its file meta plus exactly the dataset length of the
source file with the same SOP Instance UID (``storescp`` names files ``<modality>.<uid>`` and
writes the dataset bytes as sent).

Usage::

    python -m benchmarks.route [--count 200] [--rounds 3] [--settle 1] [--check-interval 0.1]

This is a measurement, not a test: figures depend on the machine and on what else runs on it,
which is why the reference copy runs in the same invocation.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from benchmarks._common import (
    BenchmarkError,
    dcmtk_tool,
    free_port,
    machine,
    stop,
    tcp_env,
    wait_port,
)
from tests.dicomgen import make_series, write_series

__all__ = ["RoundResult", "main"]

REPO = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on [^ ]+:(\d+) ")
_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "
_COMPLETE = re.compile(_STAMP + r".* complete \(", re.MULTILINE)
_DELIVERED = re.compile(_STAMP + r".*delivery \d+ to .* delivered", re.MULTILINE)
_SCU_AE = "BENCHSCU"
_NODE_AE = "DICOMNODE"
_DEST_AE = "DEST"
_POLL = 0.005  # seconds between scans of a receiving folder


@dataclass(frozen=True)
class RoundResult:
    """One round: a plain copy and one forward through the node, seconds (wall clock)."""

    instances: int
    settle: float
    plain_rate: float  # instances/s at the receiving folder, storescu -> storescp
    ingest_seconds: float  # storescu -> dicomnode, start to exit
    latency: float  # last ack to the node -> every instance complete at the destination
    to_complete: float  # last ack -> study complete (node log)
    to_first: float  # study complete -> first instance at the destination
    delivery_seconds: float  # first instance at the destination -> last complete
    forward_rate: float  # instances/s at the destination

    @property
    def overhead(self) -> float:
        """Latency beyond the quiet period the node waits on purpose."""
        return self.latency - self.settle


# --- tools and processes --------------------------------------------------------------------


def _start_storescp(folder: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    """A storescp with its own port and output folder, in its own process group."""
    out = folder / "out"
    out.mkdir(parents=True)
    port = free_port()
    # storescp 3.6.7 cannot bind to one address; it is reached only on 127.0.0.1 here.
    cmd = [dcmtk_tool("storescp"), "-aet", _DEST_AE, "-od", str(out), str(port)]
    log = (folder / "storescp.log").open("wb")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=tcp_env(), start_new_session=True
    )
    log.close()
    wait_port(port, proc)
    return proc, port, out


def _start_node(
    folder: Path, dest_port: int, settle: float, check_interval: float
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """``dicomnode serve`` with one rule forwarding everything to the storescp on dest_port."""
    folder.mkdir(parents=True)
    config = {
        "node": {"ae_title": _NODE_AE, "host": "127.0.0.1", "port": 0},
        "storage": {"root": "storage"},
        "database": {"url": "sqlite:///index.db"},
        "completion": {
            "settle_seconds": settle,
            "force_seconds": 3600,
            "check_interval": check_interval,
        },
        "nodes": {"DEST": {"ae_title": _DEST_AE, "host": "127.0.0.1", "port": dest_port}},
        "rules": [{"name": "all", "action": "forward", "destinations": ["DEST"]}],
        "broker": {"url": "embedded", "worker_threads": 2},
        "logging": {"level": "INFO"},
    }
    config_path = folder / "dicomnode.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    log_path = folder / "node.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicomnode", "serve", "--config", str(config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchmarkError(f"dicomnode serve exited:\n{log_path.read_text()[-2000:]}")
        m = _LISTENING.search(log_path.read_text(encoding="utf-8", errors="replace"))
        if m:
            return proc, int(m.group(1)), log_path
        time.sleep(0.05)
    stop(proc)
    raise BenchmarkError("dicomnode serve did not start listening within 60 s")


def _storescu(port: int, ae_title: str, files: list[Path], log: Path) -> float:
    """Send ``files`` on one association; returns the wall-clock time storescu exited."""
    cmd = [dcmtk_tool("storescu"), "-aet", _SCU_AE, "-aec", ae_title, "127.0.0.1", str(port)]
    with log.open("wb") as out:
        code = subprocess.run(
            [*cmd, *map(str, files)], stdout=out, stderr=subprocess.STDOUT, env=tcp_env()
        ).returncode
    done = time.time()
    if code:
        raise BenchmarkError(f"storescu exited with {code}; see {log}")
    return done


# --- watching a receiving folder ------------------------------------------------------------


def _dataset_offset(head: bytes) -> int:
    """Where the dataset starts: preamble, DICM, then the group 0002 elements."""
    if len(head) < 144 or head[128:132] != b"DICM":
        return -1
    return 144 + int.from_bytes(head[140:144], "little")


def _dataset_lengths(files: list[Path]) -> dict[str, int]:
    """SOP Instance UID (the file name written by write_series or storescp) -> dataset bytes."""
    import pydicom

    out = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        with path.open("rb") as f:
            offset = _dataset_offset(f.read(144))
        out[str(ds.SOPInstanceUID)] = path.stat().st_size - offset
    return out


class _FolderWatch:
    """Scans a folder every few milliseconds; records when each instance first appeared and
    when it was complete (wall clock)."""

    def __init__(self, folder: Path, expected: dict[str, int]) -> None:
        self.folder = folder
        self.expected = expected
        self.first_seen: dict[str, float] = {}
        self.complete: dict[str, float] = {}
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watch", daemon=True)

    def start(self) -> _FolderWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def wait(self, timeout: float) -> None:
        if not self.done.wait(timeout):
            raise BenchmarkError(
                f"{len(self.complete)} of {len(self.expected)} instances complete in "
                f"{self.folder} after {timeout} s"
            )

    def _run(self) -> None:
        while not self._stop.is_set() and not self.done.is_set():
            now = time.time()
            for entry in os.scandir(self.folder):
                uid = entry.name.split(".", 1)[-1]
                if uid in self.complete or uid not in self.expected:
                    continue
                self.first_seen.setdefault(uid, now)
                try:
                    with open(entry.path, "rb") as f:
                        offset = _dataset_offset(f.read(144))
                        size = os.fstat(f.fileno()).st_size
                except OSError:
                    continue
                if offset > 0 and size - offset == self.expected[uid]:
                    self.complete[uid] = now
            if len(self.complete) == len(self.expected):
                self.done.set()
                return
            time.sleep(_POLL)

    def rate(self) -> tuple[float, float]:
        """(seconds from the first instance seen to the last complete, instances/s)."""
        span = max(self.complete.values()) - min(self.first_seen.values())
        return span, (len(self.expected) - 1) / span if span > 0 else float("inf")


# --- one round ------------------------------------------------------------------------------


def _log_time(pattern: re.Pattern[str], text: str, what: str) -> float:
    m = pattern.search(text)
    if m is None:
        raise BenchmarkError(f"no '{what}' line in the node's log")
    # The node logs local time with milliseconds.
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _plain(folder: Path, files: list[Path], expected: dict[str, int]) -> float:
    proc, port, out = _start_storescp(folder)
    try:
        watch = _FolderWatch(out, expected).start()
        _storescu(port, _DEST_AE, files, folder / "storescu.log")
        watch.wait(60)
        watch.stop()
        return watch.rate()[1]
    finally:
        stop(proc)


def _forward(
    folder: Path, files: list[Path], expected: dict[str, int], settle: float, check: float
) -> RoundResult:
    dest, dest_port, out = _start_storescp(folder / "dest")
    node: subprocess.Popen[bytes] | None = None
    try:
        node, port, log_path = _start_node(folder / "node", dest_port, settle, check)
        watch = _FolderWatch(out, expected).start()
        started = time.time()
        acked = _storescu(port, _NODE_AE, files, folder / "storescu.log")
        watch.wait(120 + settle)
        watch.stop()
        arrived = max(watch.complete.values())
        first = min(watch.first_seen.values())
        # The delivery's own log line is written after the last status is committed.
        deadline = time.monotonic() + 30
        while not _DELIVERED.search(log := log_path.read_text(encoding="utf-8")):
            if time.monotonic() > deadline:
                raise BenchmarkError(f"delivery never logged as delivered; see {log_path}")
            time.sleep(0.05)
        completed = _log_time(_COMPLETE, log, "study complete")
        span, rate = watch.rate()
        return RoundResult(
            instances=len(files),
            settle=settle,
            plain_rate=0.0,
            ingest_seconds=acked - started,
            latency=arrived - acked,
            to_complete=completed - acked,
            to_first=first - completed,
            delivery_seconds=span,
            forward_rate=rate,
        )
    finally:
        stop(node)
        stop(dest)


# --- report ---------------------------------------------------------------------------------


def table(results: Sequence[RoundResult]) -> str:
    """A Markdown table of medians over rounds (min-max in brackets when several)."""

    def cell(values: list[float], fmt: str) -> str:
        med = format(statistics.median(values), fmt)
        if len(values) == 1:
            return med
        return f"{med} ({format(min(values), fmt)}-{format(max(values), fmt)})"

    r0 = results[0]
    rows = [
        ("storescu -> dicomnode, whole send (s)", [r.ingest_seconds for r in results], ".2f"),
        ("last ack -> all at destination (s)", [r.latency for r in results], ".2f"),
        (
            f"**overhead beyond settle_seconds={r0.settle:g} (s)**",
            [r.overhead for r in results],
            ".2f",
        ),
        ("  last ack -> study complete (s)", [r.to_complete for r in results], ".2f"),
        ("  complete -> first instance at destination (s)", [r.to_first for r in results], ".2f"),
        ("  delivery, first -> last instance (s)", [r.delivery_seconds for r in results], ".2f"),
        ("forward, dicomnode -> storescp (instances/s)", [r.forward_rate for r in results], ".0f"),
        ("plain copy, storescu -> storescp (instances/s)", [r.plain_rate for r in results], ".0f"),
        (
            "forward / plain copy",
            [r.forward_rate / r.plain_rate for r in results],
            ".2f",
        ),
    ]
    lines = ["| measure | median (min-max) |", "|---|---:|"]
    lines += [f"| {name} | {cell(values, fmt)} |" for name, values, fmt in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.route", description=__doc__)
    parser.add_argument("--count", type=int, default=200, help="instances (512x512 CT)")
    parser.add_argument("--rounds", type=int, default=3, help="medians over this many rounds")
    parser.add_argument("--settle", type=float, default=1.0, help="completion.settle_seconds")
    parser.add_argument(
        "--check-interval", type=float, default=0.1, help="completion.check_interval (s)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder and print it")
    args = parser.parse_args(argv)
    if args.count < 2 or args.rounds < 1 or args.settle < 0 or args.check_interval <= 0:
        parser.error("need --count >= 2, --rounds >= 1, --settle >= 0, --check-interval > 0")

    work = Path(tempfile.mkdtemp(prefix="dicomnode-route-"))
    results: list[RoundResult] = []
    try:
        print(f"generating {args.count} 512x512 CT instances ...", file=sys.stderr)
        datasets = make_series(args.count, rows=512, columns=512, modality="CT")
        files = write_series(work / "ct", datasets)
        del datasets
        expected = _dataset_lengths(files)
        mb = sum(p.stat().st_size for p in files) / len(files) / 1e6
        for rnd in range(args.rounds):
            plain = _plain(work / f"r{rnd}" / "plain", files, expected)
            fwd = _forward(
                work / f"r{rnd}" / "forward", files, expected, args.settle, args.check_interval
            )
            result = RoundResult(**{**fwd.__dict__, "plain_rate": plain})
            results.append(result)
            print(
                f"round {rnd + 1}: overhead {result.overhead:.2f} s "
                f"(complete +{result.to_complete:.2f}, first +{result.to_first:.2f}, "
                f"delivery {result.delivery_seconds:.2f}); forward {result.forward_rate:.0f}/s, "
                f"plain {result.plain_rate:.0f}/s",
                file=sys.stderr,
            )
            if not args.keep:
                shutil.rmtree(work / f"r{rnd}", ignore_errors=True)
    finally:
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}")
    print(f"machine: {machine()}")
    print(
        f"command: python -m benchmarks.route --count {args.count} --rounds {args.rounds} "
        f"--settle {args.settle:g} --check-interval {args.check_interval:g}"
    )
    print(
        f"instances: {args.count} x {mb:.2f} MB CT, one association each way; "
        f"medians of {args.rounds} round(s)"
    )
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
