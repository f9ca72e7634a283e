"""The read-only commands (``studies``, ``quarantine``, ``jobs``, ...) through ``main()`` on real
SQLite indexes: a missing index is an error that creates nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dicomnode.cli import EXIT, main

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
