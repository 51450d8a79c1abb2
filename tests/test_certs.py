"""The private CA and node certificates (`presenced.certs`) and the `certs` commands."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from presenced.certs import CertError, cert_names, init_ca, issue_node_cert
from presenced.cli_certs import certs


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_ca_writes_a_self_signed_ca(tmp_path: Path) -> None:
    cert_path, key_path = init_ca(tmp_path / "certs", name="test CA", days=30)

    assert (cert_path, key_path) == (tmp_path / "certs/ca.pem", tmp_path / "certs/ca.key")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = load(cert_path)
    cert.verify_directly_issued_by(cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test CA"
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    key = load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 30 <= lifetime.days <= 31


def test_init_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    init_ca(tmp_path)
    before = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(CertError, match=r"already exist.*--force"):
        init_ca(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == before
    init_ca(tmp_path, force=True)
    assert (tmp_path / "ca.pem").read_bytes() != before
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key", "ca.pem"]  # no temp files


def test_issue_node_cert(tmp_path: Path) -> None:
    init_ca(tmp_path)
    cert_path, key_path = issue_node_cert(
        tmp_path, "eu-1", hosts=("eu.example.com", "127.0.0.1", "::1", "eu-1")
    )

    assert (cert_path, key_path) == (tmp_path / "eu-1.pem", tmp_path / "eu-1.key")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert, ca = load(cert_path), load(tmp_path / "ca.pem")
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "eu-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["eu-1", "eu.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    key = load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    assert cert_names(cert) == {"eu-1", "eu.example.com"}


def test_issue_default_hosts_and_separate_ca_dir(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    cert_path, _ = issue_node_cert(tmp_path / "nodes", "us", ca_dir=tmp_path / "ca", days=10)
    cert = load(cert_path)
    cert.verify_directly_issued_by(load(tmp_path / "ca/ca.pem"))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["us", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 11


def test_cert_from_another_ca_does_not_verify(tmp_path: Path) -> None:
    init_ca(tmp_path / "a")
    init_ca(tmp_path / "b")
    cert_path, _ = issue_node_cert(tmp_path / "a", "eu")
    with pytest.raises((InvalidSignature, ValueError)):
        load(cert_path).verify_directly_issued_by(load(tmp_path / "b/ca.pem"))


def test_issue_refuses_to_overwrite(tmp_path: Path) -> None:
    init_ca(tmp_path)
    issue_node_cert(tmp_path, "eu")
    with pytest.raises(CertError, match="already exist"):
        issue_node_cert(tmp_path, "eu")
    issue_node_cert(tmp_path, "eu", force=True)


@pytest.mark.parametrize("node", ["", "a" * 65, "eu/1", "../evil", "e u", "é", "ca", "CA"])
def test_bad_node_names(tmp_path: Path, node: str) -> None:
    init_ca(tmp_path)
    with pytest.raises(CertError, match="bad node name"):
        issue_node_cert(tmp_path, node)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key", "ca.pem"]


@pytest.mark.parametrize("host", ["", "a b", "münchen.example", "http://x"])
def test_bad_hosts(tmp_path: Path, host: str) -> None:
    init_ca(tmp_path)
    with pytest.raises(CertError, match="bad host"):
        issue_node_cert(tmp_path, "eu", hosts=[host])


def test_missing_or_broken_ca(tmp_path: Path) -> None:
    with pytest.raises(CertError, match=r"no CA in .*ca\.pem is missing.*certs init"):
        issue_node_cert(tmp_path, "eu")
    init_ca(tmp_path)
    (tmp_path / "ca.key").write_bytes(b"garbage")
    with pytest.raises(CertError, match="cannot read the CA key"):
        issue_node_cert(tmp_path, "eu")
    init_ca(tmp_path / "other")
    (tmp_path / "ca.key").write_bytes((tmp_path / "other/ca.key").read_bytes())
    with pytest.raises(CertError, match="does not belong"):
        issue_node_cert(tmp_path, "eu")


def test_errors_are_one_line_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        issue_node_cert(tmp_path, "eu")
    assert isinstance(info.value, CertError)
    assert "\n" not in str(info.value)


def test_cert_names_from_peercert_dict_and_der(tmp_path: Path) -> None:
    peercert = {
        "subject": ((("countryName", "EU"),), (("commonName", "eu"),)),
        "subjectAltName": (("DNS", "eu"), ("DNS", "eu.example"), ("IP Address", "10.0.0.1")),
    }
    assert cert_names(peercert) == frozenset({"eu", "eu.example"})
    assert cert_names({}) == frozenset()
    assert cert_names(None) == frozenset()

    init_ca(tmp_path)
    cert_path, _ = issue_node_cert(tmp_path, "us", hosts=["us.example", "192.0.2.1"])
    cert = load(cert_path)
    assert cert_names(cert.public_bytes(Encoding.DER)) == {"us", "us.example"}
    assert cert_names(cert_path.read_bytes()) == {"us", "us.example"}
    with pytest.raises(CertError, match="not a certificate"):
        cert_names(b"nope")


# -- the command line ------------------------------------------------------------------------


def test_cli_init_and_issue(tmp_path: Path) -> None:
    runner = CliRunner()
    folder = tmp_path / "pki"
    result = runner.invoke(certs, ["init", "--dir", str(folder)])
    assert result.exit_code == 0, result.output
    assert str(folder / "ca.pem") in result.output
    assert "certs issue" in result.output  # next step

    result = runner.invoke(
        certs,
        ["issue", "eu", "--dir", str(folder), "--host", "eu.example", "--host", "10.1.2.3"],
    )
    assert result.exit_code == 0, result.output
    assert str(folder / "eu.pem") in result.output
    assert "--tls-cert" in result.output and "--tls-ca" in result.output
    cert = load(folder / "eu.pem")
    cert.verify_directly_issued_by(load(folder / "ca.pem"))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["eu", "eu.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]


def test_cli_default_dir_and_days(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(certs, ["init"]).exit_code == 0
    result = runner.invoke(certs, ["issue", "us", "--days", "7"])
    assert result.exit_code == 0, result.output
    cert = load(tmp_path / "certs/us.pem")
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 8
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["us", "localhost"]


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(certs, ["issue", "eu", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0
    assert "no CA in" in result.output and "Traceback" not in result.output

    assert runner.invoke(certs, ["init", "--dir", str(tmp_path)]).exit_code == 0
    result = runner.invoke(certs, ["init", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "already exist" in result.output and "--force" in result.output
    assert runner.invoke(certs, ["init", "--dir", str(tmp_path), "--force"]).exit_code == 0

    result = runner.invoke(certs, ["issue", "bad/name", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "bad node name" in result.output

    result = runner.invoke(certs, ["issue", "eu", "--dir", str(tmp_path), "--days", "0"])
    assert result.exit_code == 2


def test_cli_help() -> None:
    runner = CliRunner()
    result = runner.invoke(certs, ["--help"])
    assert result.exit_code == 0
    assert "init" in result.output and "issue" in result.output
    result = runner.invoke(certs, ["issue", "--help"])
    assert result.exit_code == 0
    assert "--host" in result.output and "--days" in result.output
