"""Jobs: held inputs, priorities on queues, retry and cancel from the command line."""

from __future__ import annotations

import json
from pathlib import Path

from dramatiq.brokers.stub import StubBroker
from pydicom.uid import generate_uid

from dicomnode.settings import Settings
from runners.tasks import Tasks
from storage.db import make_engine, upgrade_schema
from tests.conftest import storescu, wait_for
from tests.dicomgen import make_series, write_series
from tests.peers import StoreSCP


def _cli_json(node, *args: str) -> list[dict]:
    return json.loads(node.cli(*args, "--json").stdout)


def _brain_config(dest: StoreSCP, force: float) -> dict:
    return {
        "completion": {"settle_seconds": 1, "force_seconds": force, "check_interval": 0.2},
        "nodes": {"DEST": {"ae_title": "DEST", "host": "127.0.0.1", "port": dest.port}},
        "rules": [
            {
                "name": "brain",
                "priority": "urgent",
                "inputs": {
                    "t1": {"SeriesDescription": {"regex": "(?i)^t1"}},
                    "flair": {"SeriesDescription": {"glob": "*FLAIR*"}},
                },
                "missing_inputs": "hold",
                "action": "forward",
                "destinations": ["DEST"],
            }
        ],
    }


def test_missing_input_is_held_then_routed_when_it_arrives(make_node, tmp_path: Path) -> None:
    dest = StoreSCP(tmp_path / "dest", "DEST").start()
    try:
        node = make_node(**_brain_config(dest, force=120))
        study = generate_uid()
        t1 = make_series(3, modality="MR", study_uid=study, series_description="T1 MPRAGE")
        flair = make_series(2, modality="MR", study_uid=study, series_description="AX FLAIR")
        storescu(node.port, write_series(tmp_path / "t1", t1))
        held = wait_for(lambda: _cli_json(node, "routing"), 20, what="a routing record")
        assert held[0]["outcome"] == "held"
        assert any("waiting for input(s) flair" in line for line in held[0]["explanation"])
        assert _cli_json(node, "jobs") == []

        storescu(node.port, write_series(tmp_path / "flair", flair))
        jobs = wait_for(lambda: _cli_json(node, "jobs"), 20, what="the job")
        assert jobs[0]["rule"] == "brain" and jobs[0]["priority"] == "urgent"
        assert jobs[0]["study_version"] == 2
        assert sorted(jobs[0]["inputs"]) == ["flair", "t1"]
        # Version 2 forwards what arrived in version 2.
        wait_for(lambda: len(dest.files()) == 2, 20, what="delivery")
    finally:
        dest.stop()


def test_held_study_is_reported_unmatched_at_the_force_timeout(make_node, tmp_path: Path) -> None:
    dest = StoreSCP(tmp_path / "dest", "DEST")
    node = make_node(**_brain_config(dest, force=3))
    t1 = make_series(2, modality="MR", series_description="T1")
    storescu(node.port, write_series(tmp_path / "t1", t1))

    def outcomes() -> list[str]:
        return [r["outcome"] for r in _cli_json(node, "routing")]

    wait_for(lambda: "unmatched" in outcomes(), 30, what="release at the force timeout")
    final = next(r for r in _cli_json(node, "routing") if r["outcome"] == "unmatched")
    assert any("input flair: no series matches" in line for line in final["explanation"])
    assert _cli_json(node, "jobs") == []


def test_priorities_go_to_their_queues(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    upgrade_schema(engine)
    broker = StubBroker()
    tasks = Tasks(engine, Settings(), broker)
    tasks.enqueue_job(1, "urgent")
    tasks.enqueue_job(2, "low")
    tasks.enqueue_job(3, "normal")
    tasks.enqueue_delivery(4)

    def ids(queue: str) -> list[int]:
        return [json.loads(m)["args"][0] for m in _messages(broker, queue)]

    assert ids("jobs.urgent") == [1]
    assert ids("jobs.low") == [2]
    assert ids("jobs.normal") == [3]
    assert ids("delivery") == [4]
    broker.close()


def _messages(broker: StubBroker, queue: str) -> list[bytes]:
    q = broker.queues[queue]
    return [q.get_nowait() for _ in range(q.qsize())]


def test_failed_delivery_is_retried_from_the_command_line(make_node, tmp_path: Path) -> None:
    dest = StoreSCP(tmp_path / "dest", "DEST")  # down
    node = make_node(
        completion={"settle_seconds": 1, "force_seconds": 600, "check_interval": 0.2},
        delivery={"retry_seconds": 0.2, "retry_max_seconds": 0.5, "max_attempts": 2},
        nodes={"DEST": {"ae_title": "DEST", "host": "127.0.0.1", "port": dest.port}},
        rules=[{"name": "all", "action": "forward", "destinations": ["DEST"]}],
    )
    storescu(node.port, write_series(tmp_path / "ct", make_series(3)))

    def failed() -> list[dict]:
        return [d for d in _cli_json(node, "deliveries") if d["state"] == "failed"]

    gone = wait_for(failed, 30, what="the delivery to fail for good")[0]
    assert gone["attempts"] == 2 and "connection refused" in gone["last_error"]
    dest.start()
    try:
        out = node.cli("retry", str(gone["job"])).stdout
        assert "1 delivery(ies) pending again" in out
        wait_for(lambda: len(dest.files()) == 3, 30, what="delivery after retry")
        state = wait_for(
            lambda: [d for d in _cli_json(node, "deliveries") if d["state"] == "delivered"],
            20,
            what="delivered state",
        )
        assert state[0]["delivered"] == 3
    finally:
        dest.stop()


def test_cancel_stops_a_pending_delivery(make_node, tmp_path: Path) -> None:
    dest = StoreSCP(tmp_path / "dest", "DEST")  # down: the delivery keeps retrying
    node = make_node(
        completion={"settle_seconds": 1, "force_seconds": 600, "check_interval": 0.2},
        delivery={"retry_seconds": 1, "retry_max_seconds": 2, "max_attempts": 100},
        nodes={"DEST": {"ae_title": "DEST", "host": "127.0.0.1", "port": dest.port}},
        rules=[{"name": "all", "action": "forward", "destinations": ["DEST"]}],
    )
    storescu(node.port, write_series(tmp_path / "ct", make_series(2)))
    first = wait_for(lambda: _cli_json(node, "deliveries"), 30, what="a delivery")[0]
    out = node.cli("cancel", str(first["job"])).stdout
    assert "cancelled (1 open delivery(ies) cancelled)" in out
    rows = _cli_json(node, "deliveries")
    assert rows[0]["state"] == "cancelled"
    again = node.cli("cancel", str(first["job"]), check=False)
    assert again.returncode == 1 and "nothing to cancel" in again.stderr
