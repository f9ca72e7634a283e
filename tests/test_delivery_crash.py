"""Delivery survives crashes: kill -9 of a Redis worker or of the embedded node mid-delivery
loses nothing and resends at most the instance that was in flight."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis

from tests.conftest import storescu, wait_for
from tests.dicomgen import make_series, write_series
from tests.peers import StoreSCP, Worker, received

REDIS_URL = "redis://127.0.0.1:6379/0"
COUNT = 240


def _require_redis() -> None:
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis must answer on 127.0.0.1:6379 for this test ({exc})")


def _config(dest: StoreSCP, broker: dict) -> dict:
    return {
        "completion": {"settle_seconds": 1, "force_seconds": 600, "check_interval": 0.2},
        "delivery": {"retry_seconds": 0.5, "retry_max_seconds": 2, "lease_seconds": 2},
        "jobs": {"lease_seconds": 5},
        "broker": broker,
        "nodes": {"DEST": {"ae_title": "DEST", "host": "127.0.0.1", "port": dest.port}},
        "rules": [{"name": "all", "action": "forward", "destinations": ["DEST"]}],
    }


def _store_requests(dest: StoreSCP) -> int:
    log = (dest.folder.parent / f"{dest.ae_title}.log").read_text(errors="replace")
    return log.count("Received Store Request")


def test_redis_worker_killed_mid_delivery_then_replaced(make_node, tmp_path: Path) -> None:
    _require_redis()
    dest = StoreSCP(tmp_path / "dest", "DEST").start()
    namespace = f"dicomnode-test-{uuid.uuid4().hex[:8]}"
    node = make_node(**_config(dest, {"url": REDIS_URL, "namespace": namespace}))
    worker = Worker(node.config_path, tmp_path / "worker.log").start()
    replacement = Worker(node.config_path, tmp_path / "worker2.log")
    try:
        files = write_series(tmp_path / "ct", make_series(COUNT, rows=256, columns=256, seed=5))
        storescu(node.port, files)
        wait_for(lambda: len(dest.files()) >= COUNT // 4, 60, what="delivery to start")
        worker.kill()
        assert len(dest.files()) < COUNT, "delivery finished before the kill; make it larger"
        replacement.start()
        wait_for(lambda: len(dest.files()) == COUNT, 90, what="delivery after the restart")
        assert received(dest.folder) == received(tmp_path / "ct")
        assert COUNT <= _store_requests(dest) <= COUNT + 1  # at most the one in flight again
        assert "job 1 (rule all, forward) succeeded" in (tmp_path / "worker.log").read_text()
    finally:
        worker.kill()
        replacement.stop()
        dest.stop()
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"{namespace}:*"):
            client.delete(key)


def test_embedded_node_killed_mid_delivery_delivers_everything_after_restart(
    make_node, tmp_path: Path
) -> None:
    dest = StoreSCP(tmp_path / "dest", "DEST").start()
    node = make_node(**_config(dest, {"url": "embedded"}))
    try:
        files = write_series(tmp_path / "ct", make_series(COUNT, rows=256, columns=256, seed=6))
        storescu(node.port, files)
        wait_for(lambda: len(dest.files()) >= COUNT // 4, 60, what="delivery to start")
        node.kill()
        assert len(dest.files()) < COUNT, "delivery finished before the kill; make it larger"
        node.start()
        wait_for(lambda: len(dest.files()) == COUNT, 90, what="delivery after the restart")
        assert received(dest.folder) == received(tmp_path / "ct")
        assert COUNT <= _store_requests(dest) <= COUNT + 1
    finally:
        dest.stop()
