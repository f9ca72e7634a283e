"""RabbitMQ as the broker: ``dicomnode serve`` enqueues, a separate ``dicomnode worker`` runs the
job and the delivery, through the real RabbitMQ on 127.0.0.1:5672.

Every test gets its own virtual host (created with rabbitmqctl, deleted afterwards with all its
queues): dramatiq's RabbitmqBroker has no queue prefix, so a vhost is what keeps tests (and nodes
sharing one RabbitMQ) apart. Where rabbitmqctl cannot create one (not root on the broker host),
the default vhost is used and dicomnode's queues are deleted after the test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest

from runners.broker import QUEUES
from tests.conftest import REPO, storescu, wait_for
from tests.dicomgen import make_series, write_series
from tests.peers import StoreSCP, Worker, free_port, received

SERVER = "amqp://guest:guest@127.0.0.1:5672"


def _require_rabbitmq() -> None:
    try:
        pika.BlockingConnection(pika.URLParameters(f"{SERVER}/")).close()
    except pika.exceptions.AMQPError as exc:
        pytest.fail(
            f"RabbitMQ must answer on 127.0.0.1:5672 (user guest) for this test: "
            f"{type(exc).__name__} {exc} (apt-get install rabbitmq-server and start it)"
        )


def _rabbitmqctl(*args: str) -> bool:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        return False
    result = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)
    return result.returncode == 0


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """A broker URL on a vhost of this test's own."""
    _require_rabbitmq()
    vhost = f"dicomnode-test-{uuid.uuid4().hex[:8]}"
    if _rabbitmqctl("add_vhost", vhost):
        try:
            assert _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
            yield f"{SERVER}/{vhost}"
        finally:
            _rabbitmqctl("delete_vhost", vhost)
        return
    try:
        yield f"{SERVER}/"
    finally:
        conn = pika.BlockingConnection(pika.URLParameters(f"{SERVER}/"))
        channel = conn.channel()
        for queue in QUEUES:
            for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
                channel.queue_delete(name)
        conn.close()


def _config(dest: StoreSCP, url: str) -> dict:
    return {
        "completion": {"settle_seconds": 1, "force_seconds": 600, "check_interval": 0.2},
        "delivery": {"retry_seconds": 0.5, "retry_max_seconds": 1, "max_attempts": 50},
        "broker": {"url": url},
        "nodes": {"DEST": {"ae_title": dest.ae_title, "host": "127.0.0.1", "port": dest.port}},
        "rules": [{"name": "ct", "series": {"Modality": "CT"}, "action": "forward",
                   "destinations": ["DEST"]}],
    }  # fmt: skip


def test_serve_and_worker_forward_a_series_through_rabbitmq(
    make_node, tmp_path: Path, amqp_url: str
) -> None:
    dest = StoreSCP(tmp_path / "dest", "DEST")  # down at first: retries are delayed messages
    node = make_node(**_config(dest, amqp_url))
    worker = Worker(node.config_path, tmp_path / "worker.log").start()
    try:
        ct = write_series(tmp_path / "ct", make_series(6, modality="CT", seed=21))
        storescu(node.port, ct)

        def failed_twice() -> bool:
            rows = json.loads(node.cli("deliveries", "--json").stdout)
            return any(d["attempts"] >= 2 for d in rows)

        wait_for(failed_twice, 30, what="two failed attempts while DEST is down")
        dest.start()
        wait_for(lambda: len(dest.files()) == 6, 30, what="delivery once DEST is up")
        assert received(dest.folder) == received(tmp_path / "ct")

        # The job ran in the worker process: the message can only have come through RabbitMQ.
        wait_for(lambda: "delivery 1 to DEST" in worker.log(), 10, what="the worker's log")
        log = worker.log()
        assert "job 1 (rule ct, forward) succeeded" in log
        assert "job 1" not in node.log()
        rows = wait_for(
            lambda: [
                d
                for d in json.loads(node.cli("deliveries", "--json").stdout)
                if d["state"] == "delivered"
            ],
            10,
            what="the delivered row",
        )
        assert rows[0]["delivered"] == 6
        # The queues live in this test's vhost, and nothing is left in them.
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            channel = conn.channel()
            for queue in ("jobs.normal", "delivery"):
                ok = channel.queue_declare(queue, passive=True)
                assert ok.method.message_count == 0, queue
        finally:
            conn.close()
    finally:
        worker.stop()
        node.stop()
        dest.stop()


def test_unreachable_rabbitmq_is_a_clear_error(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    config = tmp_path / "dicomnode.yaml"
    config.write_text(
        json.dumps(
            {
                "storage": {"root": str(tmp_path / "storage")},
                "database": {"url": f"sqlite:///{tmp_path / 'index.db'}"},
                "broker": {"url": f"amqp://guest:secret@127.0.0.1:{port}/"},
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "dicomnode", "worker", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert f"cannot reach the RabbitMQ broker at amqp://guest:***@127.0.0.1:{port}/" in (
        result.stderr
    )
    assert "secret" not in result.stderr
