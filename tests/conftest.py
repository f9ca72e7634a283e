"""Shared fixtures: a real ``dicomnode serve`` process on an OS-chosen loopback port, DCMTK
senders, generated series."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dicomgen import make_series, write_series

REPO = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on [^ ]+:(\d+) ")


def require_tool(name: str) -> str:
    """The path of a required external tool; a missing tool fails the test (never skips)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run 'make test' (it installs dcmtk and dicom3tools)")
    return path


def wait_for(
    predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


@dataclass
class RunningNode:
    """A ``dicomnode serve`` subprocess with its own config, data folder and log."""

    config_path: Path
    data: Path
    log_path: Path
    config: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    _log_offset: int = field(default=0)

    def start(self, timeout: float = 30.0) -> RunningNode:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
        log.close()

        def ready() -> int | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"dicomnode serve exited with {self.proc.returncode}:\n{self.log()}")
            m = _LISTENING.search(self.log(since_start=True))
            return int(m.group(1)) if m else None

        self.port = wait_for(ready, timeout, what="dicomnode serve to listen")
        return self

    def log(self, since_start: bool = False) -> str:
        if not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()
        if since_start:
            data = data[self._log_offset :]
        return data.decode("utf-8", "replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def kill(self) -> None:
        """kill -9 the node (and its serving processes, which die with it)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        self.proc = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a ``dicomnode`` subcommand against this node's config."""
        return subprocess.run(
            [sys.executable, "-m", "dicomnode", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=check,
            timeout=120,
        )

    def studies(self) -> list[dict[str, Any]]:
        out = self.cli("studies", "--json").stdout
        result: list[dict[str, Any]] = json.loads(out)
        return result

    def storage_files(self) -> list[Path]:
        return sorted((self.data / "storage" / "studies").rglob("*.dcm"))

    def quarantined(self) -> list[dict[str, Any]]:
        reasons = sorted((self.data / "storage" / "quarantine").rglob("*.reason.json"))
        return [json.loads(p.read_text()) for p in reasons]


def node_config(data: Path, **overrides: Any) -> dict[str, Any]:
    """A config dict for a test node: loopback, OS-chosen port, state under ``data``."""
    config: dict[str, Any] = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": 0},
        "storage": {"root": str(data / "storage")},
        "database": {"url": f"sqlite:///{data / 'index.db'}"},
        "watch": [{"path": str(data / "incoming"), "stable_seconds": 0.5, "poll_seconds": 1}],
        "completion": {"settle_seconds": 2, "force_seconds": 600, "check_interval": 0.2},
        "logging": {"level": "INFO"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., RunningNode]]:
    """Factory: ``make_node(**config_overrides)`` writes a config and starts a node."""
    nodes: list[RunningNode] = []

    def factory(start: bool = True, **overrides: Any) -> RunningNode:
        data = tmp_path / f"node{len(nodes)}"
        data.mkdir()
        config = node_config(data, **overrides)
        config_path = data / "dicomnode.yaml"
        config_path.write_text(yaml.safe_dump(config))
        node = RunningNode(config_path, data, data / "node.log", config)
        nodes.append(node)
        return node.start() if start else node

    yield factory
    for node in nodes:
        node.stop()


def storescu(
    port: int,
    files: list[Path] | list[str],
    *,
    calling_ae: str = "STORESCU",
    called_ae: str = "DICOMNODE",
    extra: list[str] | None = None,
    check: bool = True,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK storescu (TCP_NODELAY on), verbose output captured."""
    exe = require_tool("storescu")
    env = {**os.environ, "TCP_NODELAY": "1"}
    cmd = [exe, "-v", "-aet", calling_ae, "-aec", called_ae, *(extra or [])]
    cmd += ["127.0.0.1", str(port), *map(str, files)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"storescu failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def ct_files(tmp_path: Path) -> list[Path]:
    """A generated 12-slice CT series (64 x 64) as Part 10 files."""
    return write_series(tmp_path / "ct", make_series(12, modality="CT"))
