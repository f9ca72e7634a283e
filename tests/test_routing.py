"""Rules: matching, explanations, configuration errors, and ``route test`` on real files."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from dicomnode.cli import EXIT, main
from dicomnode.errors import ConfigError
from dicomnode.ingest import Ingestor, Source
from dicomnode.settings import Settings, load_settings
from routing.conditions import ConditionError, compile_condition
from routing.engine import Router
from routing.rules import Rule, SeriesView, StudyView, evaluate_rules
from storage.db import make_engine, upgrade_schema
from storage.filestore import FileStore
from tests.dicomgen import make_series, write_series

values = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.text(max_size=10), max_size=4),
    st.binary(max_size=20),
)
matchers = st.one_of(
    st.text(max_size=10),
    st.integers(-100, 100),
    st.lists(st.text(max_size=5), min_size=1, max_size=3),
    st.fixed_dictionaries({"regex": st.sampled_from(["^A", "(?i)t1", "x|y", ".*"])}),
    st.fixed_dictionaries({"glob": st.sampled_from(["*", "CT*", "?R", "[A-C]*"])}),
    st.fixed_dictionaries({"gt": st.integers(-100, 100)}),
    st.fixed_dictionaries({"le": st.floats(-100, 100)}),
    st.fixed_dictionaries({"present": st.booleans()}),
)


@given(value=values, matcher=matchers)
def test_matcher_never_raises_and_not_inverts(value: Any, matcher: Any) -> None:
    attrs = {"X": value}
    plain = compile_condition({"X": matcher}).evaluate(attrs)
    negated = compile_condition({"not": {"X": matcher}}).evaluate(attrs)
    assert plain.matched != negated.matched
    if not plain.matched:
        assert plain.reasons and "X" in plain.reasons[0]


@given(value=st.floats(-1000, 1000, allow_nan=False), bound=st.floats(-1000, 1000))
def test_numeric_comparisons_agree_with_python(value: float, bound: float) -> None:
    attrs = {"SliceThickness": str(value)}
    for op, expected in (
        ("gt", value > bound),
        ("ge", value >= bound),
        ("lt", value < bound),
        ("le", value <= bound),
    ):
        assert (
            compile_condition({"SliceThickness": {op: bound}}).evaluate(attrs).matched is expected
        )


@given(st.dictionaries(st.sampled_from(["Modality", "BodyPartExamined", "Other"]), values))
def test_missing_attributes_make_rules_not_match_instead_of_crashing(attrs: dict[str, Any]) -> None:
    rule = Rule(
        name="r",
        action="forward",
        destinations=["PACS"],
        study={"all": [{"PatientID": {"present": True}}, {"any": [{"Modality": "CT"}]}]},
    )
    view = StudyView("1.2.3", attrs, [SeriesView("1.2.3.4", dict(attrs))])
    decision = evaluate_rules([rule], view)[0]
    assert not decision.matched
    assert "PatientID is missing" in decision.reasons[0]


def test_multi_valued_and_combined_conditions() -> None:
    cond = compile_condition(
        {
            "ImageType": "AXIAL",
            "any": [{"Modality": ["CT", "PT"]}, {"source.calling_ae": {"regex": "^VEL"}}],
            "not": {"SeriesDescription": {"glob": "*scout*"}},
        }
    )
    ok = {
        "ImageType": "ORIGINAL\\PRIMARY\\AXIAL",
        "Modality": "MR",
        "source.calling_ae": "VELOCITY",
    }
    assert cond.evaluate(ok).matched
    scout = {**ok, "SeriesDescription": "CT Scout"}
    out = cond.evaluate(scout)
    assert not out.matched and "'not'" in out.reasons[0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"Modality": {"regexp": "CT"}}, "unknown operator 'regexp'"),
        ({"Modality": {"regex": "("}}, "invalid regex"),
        ({"SliceThickness": {"gt": "thick"}}, "gt needs a number"),
        ({"any": []}, "non-empty list"),
        ("CT", "a condition is a mapping"),
    ],
)
def test_malformed_conditions_say_what_is_wrong(spec: Any, message: str) -> None:
    with pytest.raises(ConditionError, match=message):
        compile_condition(spec)


def test_named_inputs_are_held_while_receiving_and_unmatched_when_final() -> None:
    rule = Rule(
        name="brats",
        action="run",
        pipeline="brats",
        inputs={
            "t1": {"SeriesDescription": {"regex": "(?i)^t1$"}},
            "flair": {"SeriesDescription": {"glob": "*FLAIR*"}},
        },
    )
    view = StudyView("1", {}, [SeriesView("1.1", {"SeriesDescription": "T1"})])
    held = evaluate_rules([rule], view, final=False)[0]
    assert held.held and held.missing == ["flair"]
    final = evaluate_rules([rule], view, final=True)[0]
    assert not final.matched and not final.held
    view.series.append(SeriesView("1.2", {"SeriesDescription": "AX FLAIR"}))
    done = evaluate_rules([rule], view)[0]
    assert done.matched and done.inputs == {"t1": ["1.1"], "flair": ["1.2"]}


def test_rule_errors_in_a_rules_folder_name_file_and_line(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10-ct.yaml").write_text(
        "- name: ct\n  action: forward\n  destinations: [PACS]\n"
        "- name: bad\n  action: run\n"
        "- name: ct\n  action: forward\n  destinations: [NOWHERE]\n"
    )
    config = tmp_path / "dicomnode.yaml"
    config.write_text("rules_dir: rules\nnodes: {PACS: {ae_title: PACS, host: h, port: 104}}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    text = str(info.value)
    assert f"{rules / '10-ct.yaml'}:4: [1]: action 'run' needs 'pipeline: NAME'" in text
    assert f"{rules / '10-ct.yaml'}:6: rules: the name 'ct' is used again" in text
    assert "'NOWHERE' is not in the nodes registry (PACS)" in text


def test_route_test_explains_each_rule_on_real_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = generate_uid()
    write_series(
        tmp_path / "in",
        make_series(2, modality="MR", study_uid=study, series_description="T1", series_number=1)
        + make_series(
            2, modality="CT", study_uid=study, series_description="Chest", series_number=2
        ),
    )
    config = tmp_path / "dicomnode.yaml"
    config.write_text(
        "nodes: {PACS: {ae_title: PACS, host: 127.0.0.1, port: 104}}\n"
        "rules:\n"
        "  - {name: ct, series: {Modality: CT}, action: forward, destinations: [PACS, origin]}\n"
        "  - {name: pet, series: {Modality: PT}, action: forward, destinations: [PACS]}\n"
        "  - {name: velocity-only, study: {source.calling_ae: VELOCITY}, action: discard}\n"
    )
    code = main(["route", "test", "--config", str(config), str(tmp_path / "in"), "--json"])
    assert code == EXIT["ok"]
    report = json.loads(capsys.readouterr().out)["studies"][0]
    by_rule = {r["rule"]: r for r in report["rules"]}
    assert by_rule["ct"]["matched"]
    assert len(by_rule["ct"]["inputs"]["series"]) == 1
    assert not by_rule["pet"]["matched"]
    assert "Modality is 'CT', not equals 'PT'" in by_rule["pet"]["reasons"][0]
    assert "source.calling_ae is missing" in by_rule["velocity-only"]["reasons"][0]
    assert [j["rule"] for j in report["jobs"]] == ["ct"]

    main(
        ["route", "test", "--config", str(config), str(tmp_path / "in"), "--calling-ae", "VELOCITY"]
    )
    text = capsys.readouterr().out
    assert "rule velocity-only (discard, normal): matched" in text
    assert "=> job: rule ct forward (normal) on 1 series -> PACS, origin" in text


def test_late_instances_give_jobs_only_to_rules_with_something_new(tmp_path: Path) -> None:
    """A study routed, then late instances (new versions): a forward rule gets a job only in
    a version that brought instances to its series; a run rule runs again only when one of
    its inputs changed; the routing record says why a rule did nothing."""
    from datetime import timedelta

    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from dicomnode.completion import CompletionMonitor
    from dicomnode.ingest import Ingestor, Source
    from dicomnode.settings import Settings
    from routing.engine import Router
    from storage.db import make_engine, upgrade_schema, utcnow
    from storage.filestore import FileStore
    from storage.models import Job, RoutingRecord
    from tests.dicomgen import encoded

    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    upgrade_schema(engine)
    store = FileStore(tmp_path / "storage")
    store.prepare()
    ingestor = Ingestor(engine, store)
    settings = Settings.model_validate(
        {
            "nodes": {"PACS": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
            "rules": [
                {
                    "name": "ct-out",
                    "series": {"Modality": "CT"},
                    "action": "forward",
                    "destinations": ["PACS"],
                },
                {
                    "name": "mr-model",
                    "series": {"Modality": "MR"},
                    "action": "run",
                    "pipeline": "brain",
                },
            ],
        }
    )
    study_uid = generate_uid()
    ct = make_series(3, modality="CT", study_uid=study_uid)
    mr = make_series(3, modality="MR", study_uid=study_uid)
    source = Source(kind="dicom", calling_ae="MODALITY", peer_address="127.0.0.1")
    monitor = CompletionMonitor(engine, settings.completion)
    router = Router(engine, settings)
    clock = [utcnow()]

    def deliver(*datasets: Any) -> tuple[str, list[str]]:
        for ds in datasets:
            ingestor.ingest_network(
                encoded(ds), "1.2.840.10008.1.2.1", ds.SOPClassUID, ds.SOPInstanceUID, source
            )
        clock[0] += timedelta(seconds=settings.completion.settle_seconds + 60)
        [done] = monitor.check(now=clock[0])
        routed = router.route(done.study_pk, done.version)
        with Session(engine) as session:
            rules = session.scalars(
                select(Job.rule).where(Job.study_version == done.version).order_by(Job.rule)
            ).all()
        return routed.outcome, list(rules)

    assert deliver(*ct[:2], *mr[:2]) == ("routed", ["ct-out", "mr-model"])
    assert deliver(ct[2]) == ("routed", ["ct-out"])  # the model's MR input did not change
    assert deliver(mr[2]) == ("routed", ["mr-model"])  # nothing new for the CT forward
    with Session(engine) as session:
        records = session.scalars(select(RoutingRecord).order_by(RoutingRecord.version)).all()
    assert "rule mr-model: not run again: its inputs are unchanged since version 1" in (
        records[1].explanation
    )
    assert "rule ct-out: not forwarded again" in records[2].explanation
    engine.dispose()


def test_a_study_no_rule_matches_is_recorded_and_logged_at_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Unmatched is a normal outcome (the embedded default leaves every non-T1 study so): it is
    recorded and logged at INFO, never as a WARNING."""
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    upgrade_schema(engine)
    store = FileStore(tmp_path / "storage")
    store.prepare()
    ingestor = Ingestor(engine, store)
    source = Source(kind="folder", folder=str(tmp_path / "in"))
    for path in write_series(tmp_path / "in", make_series(2, modality="CT")):
        ingestor.ingest_file(path, source)
    settings = Settings(rules=[Rule(name="mr-only", series={"Modality": "MR"}, action="discard")])
    with caplog.at_level(logging.DEBUG, logger="routing"):
        routed = Router(engine, settings).route(1, 1)
    engine.dispose()
    assert routed.outcome == "unmatched"
    [record] = [r for r in caplog.records if "unmatched" in r.getMessage()]
    assert record.levelno == logging.INFO, record.levelname
    assert "rule mr-only" in record.getMessage()
