"""Study completion: quiet period after the last instance / association, force timeout,
re-opening by late instances. Tested like MONAI's gateway (three series over three spaced
associations) against a real node, and at unit level with an explicit clock."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import Engine, event, select

import dicomnode.ingest
from dicomnode.completion import Completed, CompletionMonitor
from dicomnode.ingest import Ingestor, Source
from dicomnode.settings import CompletionSettings
from storage.db import make_engine, upgrade_schema
from storage.filestore import FileStore
from storage.models import CompletionEvent, Instance, Study
from tests.conftest import RunningNode, storescu, wait_for
from tests.dicomgen import encoded, make_series, write_series

SETTLE = 5.0


def three_series(folder: Path, per_series: int = 4) -> list[list[Path]]:
    """Three series (CT, CT, MR) of one study, written as files, one list per series."""
    study_uid = generate_uid()
    out = []
    for number, modality in enumerate(("CT", "CT", "MR"), start=1):
        datasets = make_series(
            per_series, modality=modality, study_uid=study_uid, series_number=number, seed=number
        )
        out.append(write_series(folder / f"s{number}", datasets))
    return out


def send_spaced(node: RunningNode, batches: list[list[Path]], gap: float) -> None:
    """One storescu association per batch; the next starts ``gap`` seconds after one ends."""
    ended: float | None = None
    for files in batches:
        if ended is not None:
            time.sleep(max(0.0, ended + gap - time.monotonic()))  # the scenario's spacing
        storescu(node.port, files)
        ended = time.monotonic()


def completions(node: RunningNode, count: int, timeout: float) -> dict[str, Any]:
    """Wait until the only study has ``count`` completion events and is complete."""

    seen: list[dict[str, Any]] = []

    def done() -> dict[str, Any] | None:
        studies = node.studies()
        assert len(studies) == 1, studies
        seen[:] = studies
        study = studies[0]
        ok = study["state"] == "complete" and len(study["completions"]) >= count
        return study if ok else None

    try:
        study: dict[str, Any] = wait_for(done, timeout=timeout, interval=0.3, what="completion")
    except pytest.fail.Exception:
        pytest.fail(f"no {count} completion(s); last seen: {seen}\nnode log:\n{node.log()}")
    return study


@pytest.mark.slow
def test_three_associations_3s_apart_complete_once(make_node, tmp_path: Path) -> None:
    node = make_node(completion={"settle_seconds": SETTLE, "check_interval": 0.2})
    batches = three_series(tmp_path / "data")
    send_spaced(node, batches, gap=3.0)
    study = completions(node, 1, timeout=SETTLE + 15)
    total = sum(len(b) for b in batches)
    assert study["instances"] == total
    assert len(study["series"]) == 3
    assert [s["instances"] for s in study["series"]] == [len(b) for b in batches]
    assert [s["modality"] for s in study["series"]] == ["CT", "CT", "MR"]
    assert study["version"] == 1
    assert study["completions"] == [
        {
            "version": 1,
            "reason": "settled",
            "completed_at": study["completed_at"],
            "instances": total,
            "version_instances": total,
        }
    ]
    # The quiet period ran from the last association, not from the first instance.
    completed = datetime.fromisoformat(study["completed_at"].rstrip("Z"))
    last = datetime.fromisoformat(study["last_received_at"].rstrip("Z"))
    assert completed - last >= timedelta(seconds=SETTLE)


@pytest.mark.slow
def test_three_associations_6s_apart_complete_three_times(make_node, tmp_path: Path) -> None:
    node = make_node(completion={"settle_seconds": SETTLE, "check_interval": 0.2})
    batches = three_series(tmp_path / "data")
    send_spaced(node, batches, gap=6.0)
    study = completions(node, 3, timeout=SETTLE + 15)
    sizes = [len(b) for b in batches]
    assert study["instances"] == sum(sizes)
    assert [s["instances"] for s in study["series"]] == sizes
    assert study["version"] == 3
    events = study["completions"]
    assert [e["version"] for e in events] == [1, 2, 3]
    assert [e["reason"] for e in events] == ["settled"] * 3
    # Each version holds exactly the series of its association; nothing lost or merged.
    assert [e["version_instances"] for e in events] == sizes
    assert [e["instances"] for e in events] == [sizes[0], sum(sizes[:2]), sum(sizes)]


def test_study_that_keeps_receiving_is_forced(make_node, tmp_path: Path) -> None:
    force = 3.0
    node = make_node(
        completion={"settle_seconds": 2.0, "force_seconds": force, "check_interval": 0.1}
    )
    files = write_series(tmp_path / "ct", make_series(8))
    sent_at = []
    for f in files:  # one instance per association, every ~0.5 s: never quiet for 2 s
        storescu(node.port, [f])
        sent_at.append(time.monotonic())
        time.sleep(0.5)  # the scenario: a study that keeps arriving
    assert max(b - a for a, b in itertools.pairwise(sent_at)) < 2.0
    study = completions(node, 1, timeout=15)
    wait_for(
        lambda: sum(e["version_instances"] for e in node.studies()[0]["completions"]) == 8,
        timeout=15,
        what="every version to complete",
    )
    study = node.studies()[0]
    events = study["completions"]
    assert events[0]["version"] == 1
    assert events[0]["reason"] == "forced"
    assert [e["version"] for e in events] == list(range(1, len(events) + 1))
    first = datetime.fromisoformat(study["first_received_at"].rstrip("Z"))
    last = datetime.fromisoformat(study["last_received_at"].rstrip("Z"))
    forced_at = datetime.fromisoformat(events[0]["completed_at"].rstrip("Z"))
    assert timedelta(seconds=force) <= forced_at - first < timedelta(seconds=force + 1.5)
    assert forced_at < last, "the forced completion came while instances were still arriving"
    assert 0 < events[0]["version_instances"] < 8
    assert study["instances"] == 8


def test_late_instance_reopens_as_new_version(make_node, tmp_path: Path) -> None:
    node = make_node(completion={"settle_seconds": 1.0, "check_interval": 0.1})
    files = write_series(tmp_path / "ct", make_series(6))
    storescu(node.port, files[:5])
    study = completions(node, 1, timeout=15)
    assert study["version"] == 1
    storescu(node.port, files[5:])
    reopened = node.studies()[0]
    assert reopened["version"] == 2
    study = completions(node, 2, timeout=15)
    assert study["instances"] == 6
    events = study["completions"]
    assert [
        (e["version"], e["reason"], e["instances"], e["version_instances"]) for e in events
    ] == [
        (1, "settled", 5, 5),
        (2, "settled", 6, 1),
    ]
    # A duplicate of a stored instance does not re-open the study.
    storescu(node.port, files[:1])
    again = node.studies()[0]
    assert (again["state"], again["version"], again["duplicates"]) == ("complete", 2, 1)


# --- unit level: CompletionMonitor.check(now=...) with an explicit clock ------------------


class Clock:
    """A settable clock for the ingest path (naive UTC, like every column of the index)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, 0)

    def __call__(self) -> datetime:
        return self.now

    def at(self, seconds: float) -> datetime:
        return datetime(2026, 1, 1, 12, 0, 0) + timedelta(seconds=seconds)

    def set(self, seconds: float) -> datetime:
        self.now = self.at(seconds)
        return self.now


@pytest.fixture
def index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Engine, Ingestor, Clock]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    upgrade_schema(engine)
    store = FileStore(tmp_path / "storage")
    store.prepare()
    clock = Clock()
    monkeypatch.setattr(dicomnode.ingest, "utcnow", clock)
    yield engine, Ingestor(engine, store), clock
    engine.dispose()


def ingest(ingestor: Ingestor, ds: Dataset) -> None:
    source = Source(kind="dicom", calling_ae="UNIT", called_ae="DICOMNODE", peer_address="::1")
    ingestor.ingest_network(
        encoded(ds), ExplicitVRLittleEndian, ds.SOPClassUID, ds.SOPInstanceUID, source
    )


def events(engine: Engine) -> list[tuple[int, str, int, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                CompletionEvent.version,
                CompletionEvent.reason,
                CompletionEvent.instances,
                CompletionEvent.version_instances,
            ).order_by(CompletionEvent.id)
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def test_check_settles_after_quiet_period(index: tuple[Engine, Ingestor, Clock]) -> None:
    engine, ingestor, clock = index
    hooked: list[Completed] = []
    monitor = CompletionMonitor(
        engine, CompletionSettings(settle_seconds=5, force_seconds=60), hooked.append
    )
    series = make_series(3)
    for t, ds in zip((0, 1, 2), series, strict=True):
        clock.set(t)
        ingest(ingestor, ds)
    assert monitor.check(now=clock.at(6.9)) == []  # last instance at 2 s: due at 7 s
    done = monitor.check(now=clock.at(7.0))
    assert [(d.version, d.reason, d.instances) for d in done] == [(1, "settled", 3)]
    assert done[0].study_instance_uid == series[0].StudyInstanceUID
    assert hooked == done
    assert monitor.check(now=clock.at(100)) == []  # completes once
    assert events(engine) == [(1, "settled", 3, 3)]


def test_association_end_restarts_quiet_period(index: tuple[Engine, Ingestor, Clock]) -> None:
    engine, ingestor, clock = index
    monitor = CompletionMonitor(engine, CompletionSettings(settle_seconds=5, force_seconds=60))
    ds = make_series(1)[0]
    clock.set(0)
    ingest(ingestor, ds)
    clock.set(3)
    ingestor.touch([ds.StudyInstanceUID])  # the association that sent it ends at 3 s
    assert monitor.check(now=clock.at(7.5)) == []
    assert [d.reason for d in monitor.check(now=clock.at(8))] == ["settled"]


def test_check_forces_a_study_that_keeps_receiving(index: tuple[Engine, Ingestor, Clock]) -> None:
    engine, ingestor, clock = index
    monitor = CompletionMonitor(engine, CompletionSettings(settle_seconds=5, force_seconds=20))
    series = make_series(13)
    completed: list[tuple[float, Completed]] = []
    for i, ds in enumerate(series):  # one instance every 2 s from 0 to 24 s
        clock.set(2 * i)
        ingest(ingestor, ds)
        completed += [(2 * i, c) for c in monitor.check(now=clock.at(2 * i + 1))]
    assert [(t, c.version, c.reason) for t, c in completed] == [(20, 1, "forced")]
    assert monitor.check(now=clock.at(28.9)) == []  # version 2 began at 22 s, last at 24 s
    settled = monitor.check(now=clock.at(29))
    assert [(c.version, c.reason, c.instances) for c in settled] == [(2, "settled", 13)]
    assert events(engine) == [(1, "forced", 11, 11), (2, "settled", 13, 2)]
    with engine.connect() as conn:
        versions = conn.execute(
            select(Instance.study_version, Instance.sop_instance_uid).order_by(Instance.id)
        ).all()
    assert [v for v, _ in versions] == [1] * 11 + [2] * 2


def test_late_instance_after_completion_is_next_version(
    index: tuple[Engine, Ingestor, Clock],
) -> None:
    engine, ingestor, clock = index
    monitor = CompletionMonitor(engine, CompletionSettings(settle_seconds=5, force_seconds=60))
    first, late = make_series(2)
    clock.set(0)
    ingest(ingestor, first)
    assert len(monitor.check(now=clock.at(5))) == 1
    clock.set(30)
    ingest(ingestor, late)
    with engine.connect() as conn:
        study = conn.execute(select(Study.state, Study.version, Study.instances)).one()
    assert tuple(study) == ("receiving", 2, 2)
    assert monitor.check(now=clock.at(34)) == []
    assert [(c.version, c.instances) for c in monitor.check(now=clock.at(35))] == [(2, 2)]
    assert events(engine) == [(1, "settled", 1, 1), (2, "settled", 2, 1)]
    # A duplicate of a completed version neither re-opens it nor adds an instance.
    clock.set(60)
    ingest(ingestor, late)
    with engine.connect() as conn:
        study = conn.execute(select(Study.state, Study.version, Study.duplicates)).one()
    assert tuple(study) == ("complete", 2, 1)
    assert monitor.check(now=clock.at(100)) == []


def test_reason_is_decided_on_the_claimed_row(index: tuple[Engine, Ingestor, Clock]) -> None:
    """An instance arriving between the monitor's scan and its claim leaves the version due
    only by the force timeout: the recorded reason must say so."""
    engine, ingestor, clock = index
    monitor = CompletionMonitor(engine, CompletionSettings(settle_seconds=5, force_seconds=11))
    first, second = make_series(2)
    clock.set(0)
    ingest(ingestor, first)
    arrived: list[str] = []

    def instance_arrives(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not arrived and statement.lstrip().startswith("SELECT studies.id"):
            arrived.append(statement)
            clock.set(10)
            ingest(ingestor, second)

    event.listen(engine, "after_cursor_execute", instance_arrives)
    try:
        done = monitor.check(now=clock.at(12))  # scanned as settled (0 s), claimed as forced
    finally:
        event.remove(engine, "after_cursor_execute", instance_arrives)
    assert arrived
    assert [(c.version, c.reason, c.instances) for c in done] == [(1, "forced", 2)]
    assert events(engine) == [(1, "forced", 2, 2)]
