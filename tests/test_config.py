"""Configuration: the documented example is valid; every error names file, line, field, fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dicomnode.cli import EXIT, main
from dicomnode.errors import ConfigError
from dicomnode.settings import embedded_settings, load_settings

REPO = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dicomnode.yaml"
    path.write_text(text)
    return path


def test_documented_example_is_valid() -> None:
    settings = load_settings(REPO / "config" / "dicomnode.yaml")
    assert settings.node.ae_title == "DICOMNODE"
    assert settings.node.port == 11112
    assert settings.completion.settle_seconds == 5
    assert settings.nodes["PACS"].port == 104
    assert settings.watch[0].path == Path("/var/lib/dicomnode/incoming")


def test_every_error_is_reported_with_line_field_and_hint(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "node:\n"
        "  ae_title: THIS_TITLE_IS_TOO_LONG\n"
        "  port: eleven\n"
        "storage:\n"
        "  root: /srv/dicom\n"
        "  colour: blue\n"
        "completion: {settle_seconds: 10, force_seconds: 5}\n"
        "nodes:\n"
        "  PACS: {ae_title: PACS, host: 192.0.2.1}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    problems = info.value.problems
    text = "\n".join(problems)
    assert f"{path}:2: node.ae_title:" in text and "16 printable ASCII" in text
    assert f"{path}:3: node.port:" in text and "whole number" in text
    assert f"{path}:6: storage.colour:" in text and "remove it or check its spelling" in text
    assert f"{path}:7: completion:" in text and "force_seconds" in text
    assert f"{path}:9: nodes.PACS.port:" in text and "add this field" in text
    assert len(problems) == 5


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "node:\n  ae_title: A\n port: 1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert f"{path}:3" in str(info.value)


def test_bad_database_url_and_allowed_host_are_explained(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "database: {url: 'mysql://x'}\n"
        "node:\n  allowed_calling_aes:\n    - {ae_title: CT1, host: not-an-address}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    text = str(info.value)
    assert f"{path}:1: database.url:" in text and "postgresql://" in text
    assert f"{path}:4: node.allowed_calling_aes[0].host:" in text


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "storage: {root: state/storage}\n"
        "database: {url: 'sqlite:///state/index.db'}\n"
        "watch: [{path: drop}]\n",
    )
    settings = load_settings(path)
    assert settings.storage.root == tmp_path / "state" / "storage"
    assert settings.database.url == f"sqlite:///{tmp_path / 'state' / 'index.db'}"
    assert settings.watch[0].path == tmp_path / "drop"


def test_allow_list_by_title_and_network(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "node:\n  allowed_calling_aes: [PACS, {ae_title: CT1, host: 10.1.0.0/16}]\n",
    )
    node = load_settings(path).node
    assert node.admits("PACS", "203.0.113.9")
    assert node.admits("CT1", "10.1.2.3")
    assert not node.admits("CT1", "10.2.0.1")
    assert not node.admits("OTHER", "10.1.2.3")


def test_embedded_default_keeps_all_state_in_one_folder(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path / "data")
    root = tmp_path / "data"
    assert settings.storage.root.is_relative_to(root)
    assert settings.database.url.endswith(str(root / "index.db"))
    assert all(w.path.is_relative_to(root) for w in settings.watch)


def test_config_check_command_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "check", str(REPO / "config" / "dicomnode.yaml")]) == EXIT["ok"]
    bad = _write(tmp_path, "nodes: {PACS: {ae_title: PACS, host: h, port: 0}}\n")
    assert main(["config", "check", str(bad)]) == EXIT["config"]
    err = capsys.readouterr().err
    assert f"{bad}:1: nodes.PACS.port:" in err
    missing = tmp_path / "absent.yaml"
    assert main(["config", "check", str(missing)]) == EXIT["config"]
    assert "cannot read configuration" in capsys.readouterr().err


def test_readme_rules_example_is_a_valid_configuration(tmp_path: Path) -> None:
    text = (REPO / "README.md").read_text()
    section = text.split("## Routing rules", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    settings = load_settings(_write(tmp_path, example))
    assert [r.name for r in settings.rules] == ["ct-to-pacs-and-back", "brain-tumour", "no-scouts"]
    assert settings.rules[1].inputs is not None and len(settings.rules[1].inputs) == 4


def test_readme_models_example_is_a_valid_configuration(tmp_path: Path) -> None:
    text = (REPO / "README.md").read_text()
    example = text.split("## Models", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    example += "nodes: {PACS: {ae_title: PACS, host: 192.0.2.10, port: 104}}\n"
    settings = load_settings(_write(tmp_path, example))
    assert sorted(settings.models) == ["brain-extraction", "organs"]
    assert settings.models["organs"].path == tmp_path / "models" / "organs.pt"
    assert [s.structure().type.meaning for s in settings.models["organs"].structures] == [
        "Liver",
        "Neoplasm",
    ]


def test_range_and_type_errors_say_what_to_write_instead(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(
        tmp_path,
        "node:\n"
        "  ae_title: 104\n"  # YAML reads a number
        "  port: 70000\n"
        "  max_associations: 0\n"
        "  network_timeout: 0\n"
        "  processes: two\n"
        "storage: {root: /srv/dicom, fsync: maybe}\n"
        "logging: {level: LOUD}\n"
        "broker: {namespace: 'a b'}\n"
        "watch: {path: /srv/drop}\n"
        "completion: 5\n"
        "nodes: {PACS: {ae_title: PACS, host: h, port: 104.5}}\n"
        "delivery: {retries: 3}\n"
        "models:\n"
        "  m: {kind: onnx, path: m.onnx, inputs: [], structures: [{label: 1, name: A}]}\n",
    )
    assert main(["config", "check", str(path)]) == EXIT["config"]
    problems = [line.strip() for line in capsys.readouterr().err.splitlines()[1:]]
    expected = [
        "2: node.ae_title: Input should be a valid string (use text; put it in quotes if YAML "
        "reads it as a number, true/false or a date)",
        "3: node.port: Input should be less than or equal to 65535 "
        "(use a whole number from 0 to 65535)",
        "4: node.max_associations: Input should be greater than or equal to 1 "
        "(use a whole number from 1 to 1024)",
        "5: node.network_timeout: Input should be greater than 0 (use a value greater than 0)",
        "6: node.processes: Input should be a valid integer, unable to parse string as an "
        "integer (use a whole number from 1 to 64)",
        "7: storage.fsync: Input should be a valid boolean, unable to interpret input "
        "(use true or false)",
        "8: logging.level: Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR' "
        "(use one of these, exactly as written: case matters)",
        "9: broker.namespace: String should match pattern '^[A-Za-z0-9_.-]{1,64}$' "
        "(use a value that matches the regular expression ^[A-Za-z0-9_.-]{1,64}$)",
        "10: watch: Input should be a valid list (use a list: one '- item' line per entry, "
        "or [a, b])",
        "11: completion: Input should be a valid dictionary or instance of CompletionSettings "
        "(use a mapping: 'key: value' lines indented below it, or {key: value})",
        "12: nodes.PACS.port: Input should be a valid integer, got a number with a fractional "
        "part (use a whole number from 1 to 65535, without a fractional part)",
        "13: delivery.retries: Extra inputs are not permitted (remove it or check its spelling; "
        "allowed here: max_attempts, retry_seconds, retry_max_seconds, timeout, lease_seconds)",
        "15: models.m.version: Field required (add this field)",
        "15: models.m.inputs: List should have at least 1 item after validation, not 0 "
        "(use a list of at least 1 item(s))",
    ]
    assert problems == [f"{path}:{line}" for line in expected]
    # Every message, whatever the error, ends with what to do about it.
    assert all(re.fullmatch(r".+:\d+: \S+: .+ \(.+\)", p) for p in problems)


def test_list_entries_are_named_by_their_index_from_zero(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "node:\n"
        "  allowed_calling_aes:\n"
        "    - PACS\n"
        "    - {ae_title: CT1, host: 10.0.0.0/8, colour: red}\n"
        "watch:\n"
        "  - {path: /srv/a}\n"
        "  - {path: /srv/b, stable_seconds: -1}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    text = str(info.value)
    assert f"{path}:4: node.allowed_calling_aes[1].colour: Extra inputs" in text
    assert "allowed here: ae_title, host" in text
    assert f"{path}:7: watch[1].stable_seconds: Input should be greater than or equal to 0" in text
    assert "(use a value at least 0)" in text


def test_port_zero_lets_the_os_choose(tmp_path: Path) -> None:
    assert load_settings(_write(tmp_path, "node: {port: 0}\n")).node.port == 0
    example = (REPO / "config" / "dicomnode.yaml").read_text()
    assert "0 = a free port the OS chooses" in example
