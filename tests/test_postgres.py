"""The same ingest against PostgreSQL (127.0.0.1:5432): migrations, a real node, concurrent
serving processes. A fresh database is created for the test session and dropped at its end.
An unreachable server fails these tests: PostgreSQL is part of the supported set-up."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from alembic.script import ScriptDirectory
from psycopg2 import sql
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import Engine, event, inspect, select, text

from dicomnode.completion import Completed, CompletionMonitor
from dicomnode.ingest import Ingestor, Source
from dicomnode.settings import CompletionSettings
from storage.db import alembic_config, make_engine, upgrade_schema, utcnow
from storage.filestore import FileStore
from storage.models import CompletionEvent, Study
from tests.conftest import require_tool, storescu, wait_for
from tests.dicomgen import encoded, make_series, write_series

pytestmark = pytest.mark.postgres

_ADMIN = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}


def _admin() -> psycopg2.extensions.connection:
    try:
        conn = psycopg2.connect(connect_timeout=5, **_ADMIN)
    except psycopg2.OperationalError as exc:
        pytest.fail(
            "PostgreSQL is not reachable as user postgres on 127.0.0.1:5432 "
            f"({str(exc).strip()}); start it (the test set-up expects a local server with "
            "trust authentication) — these tests do not skip"
        )
    conn.autocommit = True
    return conn


def _create_database() -> tuple[str, str]:
    name = f"dicomnode_test_{secrets.token_hex(6)}"
    conn = _admin()
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()
    return name, f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"


def _drop_database(name: str) -> None:
    conn = _admin()
    try:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    finally:
        conn.close()


@pytest.fixture(scope="session")
def pg_session_url() -> Iterator[str]:
    """A fresh database for this test session."""
    name, url = _create_database()
    yield url
    _drop_database(name)


@pytest.fixture
def pg_url(pg_session_url: str) -> Iterator[str]:
    """The session database with its schema and no rows, for one test."""
    engine = make_engine(pg_session_url)
    upgrade_schema(engine)
    tables = [t for t in inspect(engine).get_table_names() if t != "alembic_version"]
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
    engine.dispose()
    yield pg_session_url


def _head(engine: Engine) -> str | None:
    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


def test_migrations_create_the_schema_on_a_fresh_database() -> None:
    name, url = _create_database()
    engine = make_engine(url)
    try:
        assert "studies" not in inspect(engine).get_table_names()
        upgrade_schema(engine)
        upgrade_schema(engine)  # idempotent
        tables = set(inspect(engine).get_table_names())
        assert {"studies", "series", "instances", "completions", "quarantine"} <= tables
        with engine.connect() as conn:
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        assert version == _head(engine)
        uniques = {
            tuple(u["column_names"]) for u in inspect(engine).get_unique_constraints("instances")
        }
        indexes = {
            tuple(i["column_names"])
            for i in inspect(engine).get_indexes("instances")
            if i["unique"]
        }
        assert ("sop_instance_uid",) in uniques | indexes
    finally:
        engine.dispose()
        _drop_database(name)


def test_an_index_at_an_earlier_revision_is_upgraded_in_place() -> None:
    from alembic import command

    name, url = _create_database()
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(engine)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0003")
            conn.execute(
                text(
                    "INSERT INTO quarantine (path, reason, source, size_bytes, received_at) "
                    "VALUES ('/q.dcm', 'empty', 'folder /in', 0, now())"
                )
            )
        upgrade_schema(engine)
        columns = {c["name"] for c in inspect(engine).get_columns("quarantine")}
        assert {"original_name", "sop_instance_uid", "calling_ae", "peer_address"} <= columns
        with engine.connect() as conn:
            row = conn.execute(text("SELECT path, original_name FROM quarantine")).one()
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        assert tuple(row) == ("/q.dcm", None)
        assert version == _head(engine)
    finally:
        engine.dispose()
        _drop_database(name)


def test_read_only_commands_on_a_database_without_our_tables_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicomnode.cli import EXIT, main

    name, url = _create_database()
    config = tmp_path / "dicomnode.yaml"
    config.write_text(f"database: {{url: '{url}'}}\n")
    engine = make_engine(url)
    try:
        for command in (["studies"], ["jobs", "--json"], ["quarantine"]):
            assert main([*command, "--config", str(config)]) == EXIT["no_index"]
            err = capsys.readouterr().err
            assert f"no dicomnode index at {url}: it is an empty database" in err
            assert "is --data/--config right?" in err
        assert inspect(engine).get_table_names() == []  # nothing was created
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE notes (body TEXT)"))
        assert main(["routing", "--config", str(config)]) == EXIT["no_index"]
        assert "it has no dicomnode tables" in capsys.readouterr().err
        assert inspect(engine).get_table_names() == ["notes"]
        assert main(["db", "upgrade", "--config", str(config)]) == EXIT["ok"]
        assert main(["studies", "--config", str(config)]) == EXIT["ok"]
        assert capsys.readouterr().out.endswith("no studies\n")
    finally:
        engine.dispose()
        _drop_database(name)

    # A database that does not exist: the server's own words, and what to check.
    assert main(["studies", "--config", str(config)]) == EXIT["failure"]
    err = capsys.readouterr().err
    assert f"cannot open the index database {url}: " in err and "does not exist" in err


def test_series_through_a_node_on_postgresql(make_node, pg_url: str, ct_files: list[Path]) -> None:
    node = make_node(database={"url": pg_url}, completion={"settle_seconds": 1})
    assert "postgresql+psycopg2://postgres@127.0.0.1:5432/" in node.log()
    storescu(node.port, ct_files)
    storescu(node.port, ct_files[:4])  # duplicates: counted, not stored again
    studies = node.studies()
    assert len(studies) == 1
    study = studies[0]
    assert study["patient_id"] == "PAT001"
    assert study["instances"] == len(ct_files)
    assert study["duplicates"] == 4
    assert [(s["modality"], s["instances"]) for s in study["series"]] == [("CT", len(ct_files))]
    assert len(node.storage_files()) == len(ct_files)
    assert not (node.data / "index.db").exists()
    done = wait_for(
        lambda: [s for s in node.studies() if s["state"] == "complete"],
        timeout=20,
        what="completion on PostgreSQL",
    )
    assert [(e["version"], e["reason"], e["instances"]) for e in done[0]["completions"]] == [
        (1, "settled", len(ct_files))
    ]


def _send_concurrently(port: int, batches: list[list[Path]]) -> None:
    env = {**os.environ, "TCP_NODELAY": "1"}
    exe = require_tool("storescu")
    procs = [
        subprocess.Popen(
            [exe, "-aet", f"SENDER{i}", "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, b)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i, b in enumerate(batches)
    ]
    failures = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        if p.returncode != 0:
            failures.append(out)
    assert not failures, failures


@pytest.mark.slow
def test_concurrent_ingest_from_two_processes(make_node, pg_url: str, tmp_path: Path) -> None:
    node = make_node(
        database={"url": pg_url},
        node={"processes": 2},
        completion={"settle_seconds": 30},
    )
    study_uid = make_series(1)[0].StudyInstanceUID
    batches = [
        write_series(
            tmp_path / f"s{n}",
            make_series(25, study_uid=study_uid, series_number=n, seed=n, patient_id="PG0001"),
        )
        for n in range(1, 5)
    ]
    # Four associations at once, all creating the same study row and their own series.
    _send_concurrently(node.port, batches)
    studies = node.studies()
    assert len(studies) == 1
    assert studies[0]["instances"] == 100
    assert studies[0]["duplicates"] == 0
    assert sorted(s["instances"] for s in studies[0]["series"]) == [25] * 4
    assert len(node.storage_files()) == 100

    # The same series from two associations at once: stored once, the rest counted.
    _send_concurrently(node.port, [batches[0], batches[0], batches[1]])
    study = node.studies()[0]
    assert study["instances"] == 100
    assert study["duplicates"] == 75
    assert len(node.storage_files()) == 100
    assert "Traceback" not in node.log()


@pytest.mark.parametrize(
    ("path", "first_statement"),
    [
        ("new series in this process", "SELECT studies.id, studies.state"),
        ("known series", "UPDATE studies SET instances"),
    ],
)
def test_completion_cannot_slip_between_an_ingest_and_its_commit(
    pg_url: str, path: str, first_statement: str
) -> None:
    """The monitor completing a version while an instance of it is being indexed must either
    wait for it (and count it) or leave it to the next version, never lose it."""
    engine = make_engine(pg_url)
    monitor_engine = make_engine(pg_url)
    store = FileStore(Path(tempfile.mkdtemp(prefix="dicomnode-pg-")))
    store.prepare()
    ingestor = Ingestor(engine, store)
    monitor = CompletionMonitor(monitor_engine, CompletionSettings(settle_seconds=5))
    first, second = make_series(2)
    source = Source(kind="dicom", calling_ae="RACE", called_ae="DICOMNODE", peer_address="x")

    def send(ds: Dataset) -> None:
        ingestor.ingest_network(
            encoded(ds), ExplicitVRLittleEndian, ds.SOPClassUID, ds.SOPInstanceUID, source
        )

    send(first)
    if path.startswith("new"):  # another serving process: nothing cached about the study
        ingestor = Ingestor(engine, store)
    completed: list[Completed] = []
    race: list[threading.Thread] = []

    def complete_now() -> None:
        completed.extend(monitor.check(now=utcnow() + timedelta(seconds=6)))

    def after_execute(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        # Right after the ingest has read the study row, a completion check runs.
        if not race and statement.lstrip().startswith(first_statement):
            race.append(threading.Thread(target=complete_now))
            race[0].start()
            race[0].join(timeout=1.0)  # it must block on the study row; give it the chance

    event.listen(engine, "after_cursor_execute", after_execute)
    try:
        send(second)
        assert race, f"the ingest did not run {first_statement!r}"
        race[0].join(timeout=30)
        assert not race[0].is_alive()
        with engine.connect() as conn:
            study = conn.execute(select(Study.state, Study.version, Study.instances)).one()
            rows = conn.execute(select(CompletionEvent.version, CompletionEvent.instances)).all()
        assert study.instances == 2
        # Either the check waited and counted both, or the second instance is a new version.
        counted = {version: n for version, n in rows}
        if study.state == "complete":
            assert counted[study.version] == 2, (study, rows)
        else:
            assert study.version == 2 and counted == {1: 1}, (study, rows)
    finally:
        event.remove(engine, "after_cursor_execute", after_execute)
        engine.dispose()
        monitor_engine.dispose()
        shutil.rmtree(store.root, ignore_errors=True)
