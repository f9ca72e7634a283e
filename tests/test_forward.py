"""Route and deliver: rules forward received series to real DCMTK storescp destinations."""

from __future__ import annotations

import json
from pathlib import Path

from pydicom.uid import generate_uid

from tests.conftest import storescu, wait_for
from tests.dicomgen import make_series, write_series
from tests.peers import Orthanc, StoreSCP, free_port, received


def _rules(dest: StoreSCP, origin_port: int) -> dict:
    return {
        "completion": {"settle_seconds": 1, "force_seconds": 600, "check_interval": 0.2},
        "delivery": {"retry_seconds": 0.5, "retry_max_seconds": 2, "max_attempts": 20},
        "nodes": {
            "DEST": {"ae_title": dest.ae_title, "host": "127.0.0.1", "port": dest.port},
            "WORKSTATION": {"ae_title": "WORKSTATION", "host": "127.0.0.1", "port": origin_port},
        },
        "rules": [
            {
                "name": "ct-out",
                "series": {"Modality": "CT"},
                "action": "forward",
                "destinations": ["DEST", "origin"],
            },
            {"name": "no-mr", "series": {"Modality": "MR"}, "action": "discard"},
        ],
    }


def test_ct_is_forwarded_byte_identical_to_two_destinations_and_mr_discarded(
    make_node, tmp_path: Path
) -> None:
    dest = StoreSCP(tmp_path / "dest", "DEST").start()
    origin = StoreSCP(tmp_path / "origin", "WORKSTATION").start()
    try:
        node = make_node(**_rules(dest, origin.port))
        ct = write_series(tmp_path / "ct", make_series(8, modality="CT", seed=1))
        mr = write_series(tmp_path / "mr", make_series(5, modality="MR", seed=2))
        storescu(node.port, ct, calling_ae="WORKSTATION")
        storescu(node.port, mr, calling_ae="WORKSTATION")

        wait_for(lambda: len(dest.files()) == 8 and len(origin.files()) == 8, 30, what="delivery")
        sent = received(tmp_path / "ct")
        assert received(dest.folder) == sent
        assert received(origin.folder) == sent

        jobs = json.loads(node.cli("jobs", "--json").stdout)
        assert sorted((j["rule"], j["state"]) for j in jobs) == [
            ("ct-out", "succeeded"),
            ("no-mr", "succeeded"),
        ]
        deliveries = wait_for(
            lambda: [
                d
                for d in json.loads(node.cli("deliveries", "--json").stdout)
                if d["state"] == "delivered"
            ],
            10,
            what="delivery rows",
        )
        assert sorted(d["destination"] for d in deliveries) == ["DEST", "origin"]
        assert all(d["delivered"] == d["instances"] == 8 for d in deliveries)
    finally:
        dest.stop()
        origin.stop()


def test_destination_down_is_retried_until_it_comes_up(make_node, tmp_path: Path) -> None:
    dest = StoreSCP(tmp_path / "dest", "DEST")  # not started yet
    node = make_node(**_rules(dest, free_port()))
    ct = write_series(tmp_path / "ct", make_series(4, modality="CT", seed=3))
    storescu(node.port, ct, calling_ae="WORKSTATION")

    def failed_once() -> bool:
        rows = json.loads(node.cli("deliveries", "--json").stdout)
        return any(d["destination"] == "DEST" and d["attempts"] >= 2 for d in rows)

    wait_for(failed_once, 30, what="a failed delivery attempt")
    rows = json.loads(node.cli("deliveries", "--json").stdout)
    down = next(d for d in rows if d["destination"] == "DEST")
    assert down["state"] in ("pending", "sending")
    assert "connection refused: nothing listens on port" in down["last_error"]
    dest.start()
    try:
        wait_for(lambda: len(dest.files()) == 4, 30, what="delivery after the destination is up")
        assert received(dest.folder) == received(tmp_path / "ct")
    finally:
        dest.stop()


def test_unregistered_origin_fails_the_job_with_a_clear_error(make_node, tmp_path: Path) -> None:
    dest = StoreSCP(tmp_path / "dest", "DEST").start()
    try:
        node = make_node(**_rules(dest, free_port()))
        study = generate_uid()
        ct = write_series(tmp_path / "ct", make_series(3, modality="CT", study_uid=study))
        storescu(node.port, ct, calling_ae="UNKNOWNWS")

        def failed() -> list:
            jobs = json.loads(node.cli("jobs", "--json").stdout)
            return [j for j in jobs if j["state"] == "failed"]

        job = wait_for(failed, 20, what="the job to fail")[0]
        assert "calling AE UNKNOWNWS is not in the nodes registry" in job["error"]
        # Nothing was half-done: no outbox rows were created for the failed job.
        assert json.loads(node.cli("deliveries", "--json").stdout) == []
    finally:
        dest.stop()


def test_unmatched_study_is_recorded_and_kept(make_node, tmp_path: Path) -> None:
    dest = StoreSCP(tmp_path / "dest", "DEST")
    node = make_node(**_rules(dest, free_port()))
    pt = write_series(tmp_path / "pt", make_series(2, modality="PT"))
    storescu(node.port, pt)
    routing = wait_for(
        lambda: json.loads(node.cli("routing", "--json").stdout), 20, what="a routing record"
    )
    assert routing[0]["outcome"] == "unmatched"
    assert any("Modality is 'PT', not equals 'CT'" in line for line in routing[0]["explanation"])
    assert len(node.storage_files()) == 2


def test_ct_study_reaches_storescp_and_orthanc_and_mr_reaches_neither(
    make_node, tmp_path: Path
) -> None:
    dest = StoreSCP(tmp_path / "dest", "DEST").start()
    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        config = _rules(dest, free_port())
        config["nodes"]["PACS"] = {
            "ae_title": pacs.ae_title,
            "host": "127.0.0.1",
            "port": pacs.port,
        }
        config["rules"][0]["destinations"] = ["DEST", "PACS"]
        node = make_node(**config)
        study = generate_uid()
        ct = write_series(tmp_path / "ct", make_series(6, modality="CT", study_uid=study, seed=7))
        mr = write_series(tmp_path / "mr", make_series(4, modality="MR", seed=8))
        storescu(node.port, ct + mr)
        wait_for(lambda: len(pacs.instances()) == 6 and len(dest.files()) == 6, 30, what="both")
        sent = received(tmp_path / "ct")
        assert pacs.instances() == sent
        assert received(dest.folder) == sent
    finally:
        dest.stop()
        pacs.stop()
