"""The read-only commands (``studies``, ``quarantine``, ``jobs``, ...) through ``main()`` on real
SQLite indexes: a missing index is an error that creates nothing; an index of an earlier release
is upgraded; what the listings say."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import Engine, inspect, text

from dicomnode.cli import EXIT, main
from dicomnode.errors import QuarantinedError
from dicomnode.ingest import Ingestor, Source
from storage.db import alembic_config, make_engine
from storage.filestore import FileStore
from tests.dicomgen import encoded, make_series, write_series

# Every command that reads (or edits rows of) an existing index and must never create one.
READ_ONLY = [
    ["studies"],
    ["studies", "--json"],
    ["quarantine"],
    ["quarantine", "--json"],
    ["jobs"],
    ["deliveries", "--json"],
    ["routing"],
    ["retry", "1"],
    ["cancel", "1"],
]


@pytest.mark.parametrize("command", READ_ONLY, ids=" ".join)
def test_read_only_command_on_a_missing_data_folder_fails_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    typo = tmp_path / "typo"
    assert main([*command, "--data", str(typo)]) == EXIT["no_index"]
    out, err = capsys.readouterr()
    assert out == ""
    assert f"dicomnode: no dicomnode index at {typo / 'index.db'} " in err
    assert "is --data/--config right? the node creates it on first start" in err
    assert not typo.exists()


def test_read_only_command_with_a_config_whose_index_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "dicomnode.yaml"
    config.write_text("database: {url: 'sqlite:///state/index.db'}\n")
    assert main(["jobs", "--config", str(config)]) == EXIT["no_index"]
    assert f"no dicomnode index at {tmp_path / 'state' / 'index.db'} " in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dicomnode.yaml"]


def test_a_file_that_is_not_an_index_is_left_as_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "index.db").write_bytes(b"not a database, just some notes\n" * 10)
    assert main(["studies", "--data", str(data)]) == EXIT["no_index"]
    assert "it is not an SQLite database" in capsys.readouterr().err

    other = sqlite3.connect(data / "index.db.other")
    other.execute("CREATE TABLE notes (text TEXT)")
    other.commit()
    other.close()
    (data / "index.db").unlink()
    (data / "index.db.other").rename(data / "index.db")
    before = (data / "index.db").read_bytes()
    assert main(["quarantine", "--data", str(data)]) == EXIT["no_index"]
    assert f"no dicomnode index at {data / 'index.db'}: it has no dicomnode tables" in (
        capsys.readouterr().err
    )
    assert (data / "index.db").read_bytes() == before
    assert sorted(p.name for p in data.iterdir()) == ["index.db"]


def test_db_upgrade_creates_the_index_the_read_only_commands_then_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    assert main(["db", "upgrade", "--data", str(data)]) == EXIT["ok"]
    assert (data / "index.db").is_file()
    capsys.readouterr()
    assert main(["studies", "--data", str(data)]) == EXIT["ok"]
    assert capsys.readouterr().out == "no studies\n"
    assert main(["quarantine", "--data", str(data)]) == EXIT["ok"]
    assert capsys.readouterr().out == "quarantine is empty\n"


def _index_at(data: Path, revision: str) -> Engine:
    """An index at an older schema revision, as an earlier release of the node left it."""
    data.mkdir(parents=True, exist_ok=True)
    engine = make_engine(f"sqlite:///{data / 'index.db'}")
    with engine.begin() as conn:
        cfg = alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return engine


def test_an_index_of_an_earlier_release_is_upgraded_and_keeps_its_quarantine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    engine = _index_at(data, "0003")
    with engine.begin() as conn:
        assert "original_name" not in {c["name"] for c in inspect(conn).get_columns("quarantine")}
        conn.execute(
            text(
                "INSERT INTO quarantine (path, reason, source, size_bytes, received_at) VALUES "
                "('/old/q.dcm', 'not a readable DICOM instance: empty', 'folder /old/in', 0, "
                "'2026-11-30 10:00:00')"
            )
        )
    engine.dispose()

    assert main(["quarantine", "--data", str(data)]) == EXIT["ok"]  # upgrades, then lists
    assert capsys.readouterr().out == (
        "2026-11-30T10:00:00Z  folder /old/in: not a readable DICOM instance: empty\n"
        "    /old/q.dcm\n"
    )
    engine = make_engine(f"sqlite:///{data / 'index.db'}")
    with engine.connect() as conn:
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    assert version == ScriptDirectory.from_config(alembic_config(engine)).get_current_head()

    # New quarantine records of the upgraded index name their input.
    store = FileStore(data / "storage")
    store.prepare()
    source = Source(kind="dicom", calling_ae="MODALITY", called_ae="DICOMNODE", peer_address="::1")
    with pytest.raises(QuarantinedError):
        Ingestor(engine, store).ingest_network(
            b"\x00" * 10, ExplicitVRLittleEndian, "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4", source
        )
    engine.dispose()
    assert main(["quarantine", "--json", "--data", str(data)]) == EXIT["ok"]
    old, new = json.loads(capsys.readouterr().out)
    assert (old["original_name"], old["sop_instance_uid"], old["calling_ae"]) == (None,) * 3
    assert (new["sop_instance_uid"], new["calling_ae"], new["peer_address"]) == (
        "1.2.3.4",
        "MODALITY",
        "::1",
    )
    assert new["original_name"] is None and Path(new["path"]).is_file()


def test_studies_lists_series_by_number_with_their_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    engine = _index_at(data, "head")
    store = FileStore(data / "storage")
    store.prepare()
    ingestor = Ingestor(engine, store)
    study = generate_uid()
    ct = Source(kind="dicom", calling_ae="CT1", called_ae="DICOMNODE", peer_address="127.0.0.1")
    drop = Source(kind="folder", folder=str(tmp_path / "in"))
    # Arrival order: #10, then #2 from the folder, then #1 and one without a number.
    arrivals = [
        (make_series(1, study_uid=study, series_number=10, series_description="late"), ct),
        (make_series(2, study_uid=study, series_number=2, series_description="dropped"), drop),
        (make_series(1, study_uid=study, series_number=1, series_description="first"), ct),
        (make_series(1, study_uid=study, series_description="unnumbered"), ct),
    ]
    del arrivals[3][0][0].SeriesNumber
    for datasets, source in arrivals:
        if source.kind == "folder":
            for path in write_series(tmp_path / "in", datasets):
                ingestor.ingest_file(path, source)
            continue
        for ds in datasets:
            ingestor.ingest_network(
                encoded(ds), ExplicitVRLittleEndian, ds.SOPClassUID, ds.SOPInstanceUID, source
            )
    engine.dispose()

    assert main(["studies", "--data", str(data)]) == EXIT["ok"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{study}  patient PAT001  20260101  receiving (v1)  5 instances")
    series = [line.split() for line in lines[1:]]
    assert [(s[1], s[2], s[3]) for s in series] == [
        ("#1", "1", "first"),
        ("#2", "2", "dropped"),
        ("#10", "1", "late"),
        ("#-", "1", "unnumbered"),
    ]
    sources = ["CT1@127.0.0.1", f"folder {tmp_path / 'in'}", "CT1@127.0.0.1", "CT1@127.0.0.1"]
    for line, source in zip(lines[1:], sources, strict=True):
        assert line.endswith(f"]  from {source}"), line
