"""TLS to destinations: a DCMTK storescp with ``+tls`` (OpenSSL) as the peer, a throwaway CA
and certificates made with the openssl CLI for each test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicomnode.errors import ConfigError
from dicomnode.settings import load_settings
from tests.conftest import REPO, require_tool, storescu, wait_for
from tests.dicomgen import make_series, write_series
from tests.peers import StoreSCP, received


class Pki:
    """A CA and certificates it signs, as PEM files in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.openssl = require_tool("openssl")
        folder.mkdir(parents=True, exist_ok=True)

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [self.openssl, *args], capture_output=True, text=True, cwd=self.folder, timeout=60
        )
        if result.returncode != 0:
            pytest.fail(f"openssl {' '.join(args)} failed:\n{result.stderr}")

    def ca(self, name: str) -> Path:
        self._run(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        return self.folder / f"{name}.pem"

    def issue(self, ca: str, name: str, usage: str, san: str = "IP:127.0.0.1") -> tuple[Path, Path]:
        """A key and certificate signed by ``ca``; returns (key, certificate)."""
        ext = self.folder / f"{name}.ext"
        ext.write_text(
            f"subjectAltName={san}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        )
        self._run(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}",
        )  # fmt: skip
        self._run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", ext.name,
        )  # fmt: skip
        return self.folder / f"{name}.key", self.folder / f"{name}.pem"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    pki = Pki(tmp_path / "pki")
    pki.ca("ca")
    pki.ca("other-ca")
    pki.issue("ca", "server", "serverAuth")
    pki.issue("ca", "server-dns", "serverAuth", san="DNS:pacs.invalid")
    pki.issue("ca", "client", "clientAuth")
    return pki


def _tls_scp(tmp_path: Path, pki: Pki, server: str = "server") -> StoreSCP:
    """storescp speaking only TLS and requiring a client certificate signed by our CA."""
    key, cert = pki.folder / f"{server}.key", pki.folder / f"{server}.pem"
    args = ["+tls", str(key), str(cert), "-pw", "+cf", str(pki.folder / "ca.pem"), "-rc"]
    return StoreSCP(tmp_path / "dest", "TLSDEST", args=args).start()


def _entry(dest: StoreSCP, pki: Pki, **tls: Any) -> dict[str, Any]:
    entry = {
        "ae_title": dest.ae_title,
        "host": "127.0.0.1",
        "port": dest.port,
        "tls": True,
        "tls_ca": str(pki.folder / "ca.pem"),
        "tls_cert": str(pki.folder / "client.pem"),
        "tls_key": str(pki.folder / "client.key"),
    }
    entry.update({k: str(v) if isinstance(v, Path) else v for k, v in tls.items()})
    return {k: v for k, v in entry.items() if v is not None}


def _forward(dest_entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "completion": {"settle_seconds": 1, "force_seconds": 600, "check_interval": 0.2},
        "delivery": {"retry_seconds": 0.5, "retry_max_seconds": 1, "max_attempts": 50},
        "nodes": {"TLSDEST": dest_entry},
        "rules": [{"name": "all", "action": "forward", "destinations": ["TLSDEST"]}],
    }


def _echo(config: Path, target: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", "echo", target, "--config", str(config), *extra],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def _echo_config(tmp_path: Path, nodes: dict[str, Any]) -> Path:
    path = tmp_path / "echo.yaml"
    path.write_text(yaml.safe_dump({"node": {"ae_title": "DICOMNODE"}, "nodes": nodes}))
    return path


def test_series_is_forwarded_over_tls_with_a_client_certificate(
    make_node, tmp_path: Path, pki: Pki
) -> None:
    dest = _tls_scp(tmp_path, pki)
    try:
        node = make_node(**_forward(_entry(dest, pki)))
        ct = write_series(tmp_path / "ct", make_series(5, modality="CT", seed=11))
        storescu(node.port, ct)
        wait_for(lambda: len(dest.files()) == 5, 30, what="delivery over TLS")
        assert received(dest.folder) == received(tmp_path / "ct")
        rows = wait_for(
            lambda: [
                d
                for d in json.loads(node.cli("deliveries", "--json").stdout)
                if d["state"] == "delivered"
            ],
            10,
            what="the delivery row",
        )
        assert rows[0]["destination"] == "TLSDEST" and rows[0]["delivered"] == 5
        # The peer speaks nothing but TLS: the same port without TLS gets no association.
        plain = _echo(node.config_path, f"127.0.0.1:{dest.port}", "--ae", "TLSDEST")
        assert plain.returncode == 4, plain.stdout + plain.stderr
        assert len(dest.files()) == 5
    finally:
        dest.stop()


def test_wrong_ca_fails_the_delivery_naming_the_destination_and_retries(
    make_node, tmp_path: Path, pki: Pki
) -> None:
    dest = _tls_scp(tmp_path, pki)
    try:
        node = make_node(**_forward(_entry(dest, pki, tls_ca=pki.folder / "other-ca.pem")))
        ct = write_series(tmp_path / "ct", make_series(3, modality="CT", seed=12))
        storescu(node.port, ct)

        def retried() -> list[dict[str, Any]]:
            rows = json.loads(node.cli("deliveries", "--json").stdout)
            return [d for d in rows if d["attempts"] >= 2 and d["last_error"]]

        row = wait_for(retried, 30, what="a second failed TLS attempt")[0]
        assert row["destination"] == "TLSDEST"
        assert row["state"] in ("pending", "sending")
        where = f"TLSDEST@127.0.0.1:{dest.port} (TLS)"
        assert row["last_error"].startswith(f"{where}: TLS: its certificate is not trusted: ")
        assert "tls_ca must hold the CA that signed it" in row["last_error"]
        log = node.log()
        assert f"to TLSDEST ({where.removesuffix(' (TLS)')}) attempt 1: {where}: TLS" in log
        assert "retry in" in log
        assert dest.files() == []
    finally:
        dest.stop()


def test_echo_over_tls_and_what_it_says_when_tls_fails(tmp_path: Path, pki: Pki) -> None:
    dest = _tls_scp(tmp_path, pki)
    dns_dest = StoreSCP(
        tmp_path / "dest-dns",
        "TLSDEST",
        args=[
            "+tls", str(pki.folder / "server-dns.key"), str(pki.folder / "server-dns.pem"),
            "-pw", "-ic",
        ],
    ).start()  # fmt: skip
    try:
        config = _echo_config(
            tmp_path,
            {
                "GOOD": _entry(dest, pki),
                "WRONGCA": _entry(dest, pki, tls_ca=pki.folder / "other-ca.pem"),
                "NOCERT": _entry(dest, pki, tls_cert=None, tls_key=None),
                "PLAIN": {"ae_title": "TLSDEST", "host": "127.0.0.1", "port": dest.port},
                "OTHERNAME": _entry(dns_dest, pki),
                "NOHOSTCHECK": _entry(dns_dest, pki, tls_verify_hostname=False),
            },
        )
        good = _echo(config, "GOOD")
        assert (good.returncode, good.stdout.strip()) == (
            0,
            f"C-ECHO TLSDEST@127.0.0.1:{dest.port}: success",
        ), good.stderr
        wrong = _echo(config, "WRONGCA")
        assert wrong.returncode == 4
        assert "TLS: its certificate is not trusted" in wrong.stderr
        nocert = _echo(config, "NOCERT")
        assert nocert.returncode == 4
        assert "TLS handshake failed" in nocert.stderr
        assert "CERTIFICATE_REQUIRED" in nocert.stderr.upper()
        plain = _echo(config, "PLAIN")
        assert plain.returncode == 4
        assert "accepted the connection but not the association request" in plain.stderr
        assert "does it expect TLS?" in plain.stderr
        other = _echo(config, "OTHERNAME")
        assert other.returncode == 4
        assert "not trusted" in other.stderr and "mismatch" in other.stderr
        assert _echo(config, "NOHOSTCHECK").returncode == 0
    finally:
        dest.stop()
        dns_dest.stop()


def _problems(tmp_path: Path, entry: dict[str, Any]) -> str:
    path = tmp_path / "cfg" / "dicomnode.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({"nodes": {"PACS": entry}}, sort_keys=False))
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value)


def test_tls_settings_are_validated_with_field_and_fix(tmp_path: Path, pki: Pki) -> None:
    base = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104, "tls": True}
    missing = _problems(tmp_path, {**base, "tls_ca": "ca/missing.pem"})
    cfg = tmp_path / "cfg"
    assert f"dicomnode.yaml:7: nodes.PACS.tls_ca: {cfg / 'ca/missing.pem'} does not exist" in (
        missing
    )
    assert "put the CA certificate(s)" in missing and "or fix the path" in missing

    off = _problems(tmp_path, {**base, "tls": False, "tls_ca": str(pki.folder / "ca.pem")})
    assert "nodes.PACS: tls_ca set but tls is false: set 'tls: true'" in off

    key_only = _problems(tmp_path, {**base, "tls_key": str(pki.folder / "client.key")})
    assert "tls_key is set without tls_cert" in key_only

    mismatch = _problems(
        tmp_path,
        {
            **base,
            "tls_cert": str(pki.folder / "client.pem"),
            "tls_key": str(pki.folder / "server.key"),
        },
    )
    assert "cannot load the client certificate" in mismatch

    not_pem = _problems(tmp_path, {**base, "tls_ca": str(pki.folder / "client.ext")})
    assert "tls_ca" in not_pem and "cannot load CA certificates" in not_pem

    # Relative paths are relative to the config file's folder.
    (cfg / "ca.pem").write_bytes((pki.folder / "ca.pem").read_bytes())
    (cfg / "dicomnode.yaml").write_text(
        yaml.safe_dump({"nodes": {"PACS": {**base, "tls_ca": "ca.pem"}}})
    )
    assert load_settings(cfg / "dicomnode.yaml").nodes["PACS"].tls_ca == cfg / "ca.pem"
