"""Helpers shared by the benchmarks: DCMTK tools, loopback ports, stopping servers by PID."""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = [
    "BenchmarkError",
    "dcmtk_tool",
    "free_port",
    "machine",
    "stop",
    "tcp_env",
    "wait_port",
]


class BenchmarkError(RuntimeError):
    """A server did not start, a send failed, or instances are missing afterwards."""


def dcmtk_tool(name: str) -> str:
    """The DCMTK executable ``name`` (pynetdicom installs apps with the same names)."""
    dirs = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]
    for d in dirs:
        exe = Path(d) / name
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            continue
        try:
            version = subprocess.run(
                [str(exe), "--version"], capture_output=True, text=True, timeout=10
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in version.lower():
            return str(exe)
    raise BenchmarkError(f"DCMTK {name} not found: install the dcmtk package")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Wait until something listens on 127.0.0.1:``port``; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchmarkError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchmarkError(f"nothing listens on port {port} after {timeout} s")


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a server by its PID; SIGKILL its own process group if it does not stop."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def tcp_env() -> dict[str, str]:
    """DCMTK sets TCP_NODELAY only when the environment says so (Nagle costs ~20x here)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count() or 0
    return f"{cores} cores{f' ({model})' if model else ''}, Linux {platform.release()}"
