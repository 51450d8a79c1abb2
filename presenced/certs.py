"""A small private CA for the links between regions: make it, issue node certificates, read them.

Daemons in different regions talk over mutually authenticated TLS (see
:mod:`presenced.server.peers.tls`): each holds one certificate, signed by a CA all regions
trust, and uses it both to accept and to dial, so every node certificate carries the
``serverAuth`` and ``clientAuth`` extended key usages. Its names (the subject CN and the DNS
subject alternative names) always include the node name, which is how the gossip layer checks
that the peer on a channel is the node it claims to be (:func:`cert_names`); the other SANs are
the host names and addresses peers dial it at.

Layout of a certificate directory (``presenced certs init`` / ``presenced certs issue``)::

    ca.pem  ca.key          the CA (keep ca.key off the servers if you can)
    <node>.pem <node>.key   one pair per node

All keys are EC P-256, written unencrypted with mode 0600. Nothing is ever overwritten unless
asked (``force=True``). Every failure is a :class:`CertError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CertError",
    "cert_names",
    "init_ca",
    "issue_node_cert",
    "validate_node_name",
]

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"

_NODE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: Backdating of notBefore, so that a peer whose clock is a little behind accepts a new cert.
_CLOCK_SKEW = dt.timedelta(minutes=5)

PathLike = str | os.PathLike[str]


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """ECDSA keys only sign: TLS handshakes always, certificates and CRLs only for the CA."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


class CertError(ValueError):
    """A certificate operation failed; ``str(error)`` is a one-line reason fit for a user."""


def validate_node_name(node: object) -> str:
    """Return ``node`` if it is a valid node name (1..64 of ``A-Z a-z 0-9 _ . -``)."""
    if not isinstance(node, str) or not _NODE_RE.fullmatch(node):
        raise CertError(f"bad node name {node!r}: must be 1..64 characters of A-Z a-z 0-9 _ . -")
    if node.lower() == "ca":
        raise CertError(
            f"bad node name {node!r}: its files would clash with the CA's ca.pem/ca.key"
        )
    return node


def init_ca(
    directory: PathLike,
    *,
    name: str = "presenced dev CA",
    days: int = 3650,
    force: bool = False,
) -> tuple[Path, Path]:
    """Create a new CA in ``directory`` (made if missing): ``ca.pem`` and ``ca.key``.

    Returns ``(cert_path, key_path)``. Refuses to replace an existing CA unless ``force``:
    every node certificate it issued would stop being trusted.
    """
    if not name or not name.strip():
        raise CertError("the CA name must not be empty")
    _check_days(days)
    folder = _make_dir(directory)
    cert_path, key_path = folder / CA_CERT_FILE, folder / CA_KEY_FILE
    _refuse_overwrite((cert_path, key_path), force, "a CA")

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    _write_pair(cert_path, key_path, cert, key)
    return cert_path, key_path


def issue_node_cert(
    directory: PathLike,
    node: str,
    *,
    hosts: Iterable[str] = ("localhost", "127.0.0.1"),
    days: int = 825,
    ca_dir: PathLike | None = None,
    force: bool = False,
) -> tuple[Path, Path]:
    """Issue ``<node>.pem`` / ``<node>.key`` in ``directory``, signed by the CA in ``ca_dir``.

    ``ca_dir`` defaults to ``directory``. The certificate's subject CN is ``node``; its SANs
    are ``DNS:<node>`` plus each of ``hosts`` (an ``IP:`` entry if it parses as an IP address,
    else ``DNS:``); it is usable both as a TLS server and as a TLS client. Its lifetime is
    ``days``, cut short to the CA's own expiry. Refuses to replace existing files unless
    ``force``. Returns ``(cert_path, key_path)``.
    """
    validate_node_name(node)
    _check_days(days)
    if isinstance(hosts, str):  # a lone string is a classic mistake: "abc" -> "a", "b", "c"
        hosts = (hosts,)
    sans = _subject_alt_names(node, hosts)
    ca_folder = Path(directory if ca_dir is None else ca_dir)
    ca_cert, ca_key = _load_ca(ca_folder)
    folder = _make_dir(directory)
    cert_path, key_path = folder / f"{node}.pem", folder / f"{node}.key"
    _refuse_overwrite((cert_path, key_path), force, f"a certificate for {node!r}")

    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise CertError(f"the CA in {ca_folder} has expired; make a new one with `certs init`")
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - _CLOCK_SKEW, ca_cert.not_valid_before_utc))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_pair(cert_path, key_path, cert, key)
    return cert_path, key_path


def cert_names(cert: Mapping[str, Any] | bytes | x509.Certificate | None) -> frozenset[str]:
    """The names a certificate proves: its subject CN(s) and its DNS subject alternative names.

    Accepts what ``ssl.SSLObject.getpeercert()`` returns (the dict form; an empty dict or None,
    as for an unverified peer, gives the empty set), DER or PEM bytes
    (``getpeercert(binary_form=True)``), or a ``cryptography`` certificate. IP address SANs
    are not names and are left out.
    """
    if cert is None:
        return frozenset()
    if isinstance(cert, Mapping):
        return _names_from_peercert(cert)
    if isinstance(cert, bytes | bytearray | memoryview):
        data = bytes(cert)
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                cert = x509.load_pem_x509_certificate(data)
            else:
                cert = x509.load_der_x509_certificate(data)
        except ValueError as exc:
            raise CertError(f"not a certificate: {_one_line(exc)}") from None
    if not isinstance(cert, x509.Certificate):
        raise CertError(f"not a certificate: {type(cert).__name__}")
    names = {str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
    with contextlib.suppress(x509.ExtensionNotFound):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names.update(san.get_values_for_type(x509.DNSName))
    return frozenset(names)


# -- helpers ------------------------------------------------------------------------------------


def _names_from_peercert(peercert: Mapping[str, Any]) -> frozenset[str]:
    names: set[str] = set()
    try:
        for rdn in peercert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    names.add(str(value))
        for kind, value in peercert.get("subjectAltName", ()):
            if kind == "DNS":
                names.add(str(value))
    except (TypeError, ValueError):
        raise CertError("malformed peer certificate dictionary") from None
    return frozenset(names)


def _subject_alt_names(node: str, hosts: Iterable[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = [x509.DNSName(node)]
    for host in hosts:
        if not isinstance(host, str) or not host.strip():
            raise CertError(f"bad host {host!r}: must be a non-empty host name or IP address")
        host = host.strip()
        general: x509.GeneralName
        try:
            general = x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            if not host.isascii() or any(c.isspace() or c in "/:@[]" for c in host):
                raise CertError(
                    f"bad host {host!r}: must be an ASCII DNS name (use the IDNA 'xn--' form)"
                    " or an IP address"
                ) from None
            general = x509.DNSName(host.lower())
        if general not in sans:
            sans.append(general)
    return sans


def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = folder / CA_CERT_FILE, folder / CA_KEY_FILE
    if not cert_path.exists() or not key_path.exists():
        missing = cert_path if not cert_path.exists() else key_path
        raise CertError(f"no CA in {folder} ({missing.name} is missing); run `certs init` first")
    # cryptography's own messages run to a FAQ address and a parser state; say what is wrong.
    try:
        cert = x509.load_pem_x509_certificate(_read(cert_path))
    except ValueError:
        raise CertError(
            f"cannot read the CA certificate {cert_path}: not a PEM certificate"
        ) from None
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except TypeError:  # it needs a password
        raise CertError(f"cannot read the CA key {key_path}: it is encrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertError(f"cannot read the CA key {key_path}: not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"the CA key {key_path} is not an EC key")
    if key.public_key() != cert.public_key():
        raise CertError(f"the CA key {key_path} does not belong to the certificate {cert_path}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertError(f"{cert_path} is not a CA certificate")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        raise CertError(f"{cert_path} is not a self-signed CA certificate") from None
    return cert, key


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key()  # type: ignore[arg-type]
        )
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertError(f"cannot read {path}: {exc.strerror or exc}") from None


def _make_dir(directory: PathLike) -> Path:
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CertError(f"cannot create directory {folder}: {exc.strerror or exc}") from None
    if not folder.is_dir():
        raise CertError(f"{folder} is not a directory")
    return folder


def _refuse_overwrite(paths: Iterable[Path], force: bool, what: str) -> None:
    if force:
        return
    existing = [str(path) for path in paths if path.exists() or path.is_symlink()]
    if existing:
        raise CertError(
            f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''};"
            f" not replacing {what} (use --force / force=True to overwrite)"
        )


def _write_pair(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The key first: a certificate without its key is useless, a key without its cert harmless.
    _write_file(key_path, key_pem, 0o600)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + rename) with ``mode``."""
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise CertError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as tmp:  # mkstemp creates the file with mode 0600
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        if mode != 0o600:
            os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise CertError(f"cannot write {path}: {exc.strerror or exc}") from None


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 36500:
        raise CertError(f"bad validity {days!r}: must be a whole number of days, 1..36500")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
