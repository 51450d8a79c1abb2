"""Start-up checks: the outside world (TLS files, addresses, the secret file) as operator errors.

A bad option value that only the outside world reveals (a garbage PEM file, a key that is
not the certificate's, a host that does not resolve, a port another process holds) is the
same kind of mistake as a misspelt option, so it ends the same way: one line naming the
option and the problem, and exit status 2, never a traceback. Code that finds such a
problem raises :class:`StartupError` with the configuration key at fault; the command line
turns it into that line, naming the option as the operator gave it (flag, environment
variable or config file key), which only the command line knows.

Mistakes the daemon can run with (a node certificate that does not name ``--node``, a
token secret others can read) are warnings instead: one log line each, at start.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import stat
from collections.abc import Mapping
from pathlib import Path

import trio
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from presenced.certs import CertError, cert_names
from presenced.server.peers.tls_contexts import client_context, server_context

__all__ = [
    "ListenError",
    "StartupError",
    "TlsMaterial",
    "find_startup_error",
    "load_tls",
    "node_cert_warning",
    "open_listeners",
    "secret_file_warning",
]


class StartupError(Exception):
    """A start-up problem with the value of the configuration key ``key`` (like ``listen``)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem

    def describe(self, where: Mapping[str, str]) -> str:
        """The one-line message, with the key named as ``where`` says the user gave it."""
        return f"{where.get(self.key, self.key)}: {self.problem}"


class ListenError(StartupError, OSError):
    """An address that cannot be listened on. Also the ``OSError`` it was, with its errno
    and strerror, so code that handles a failed bind as one (the demo) still does."""

    def __init__(self, key: str, problem: str, cause: OSError) -> None:
        super().__init__(key, problem)
        self.errno = cause.errno
        self.strerror = cause.strerror


def find_startup_error(exc: BaseException) -> StartupError | None:
    """The :class:`StartupError` in ``exc``, looking inside (nested) exception groups: a
    failure in one of the daemon's tasks reaches ``trio.run``'s caller wrapped in one."""
    if isinstance(exc, StartupError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_startup_error(inner)
            if found is not None:
                return found
    return None


# -- listening -----------------------------------------------------------------------------------


async def open_listeners(host: str | None, port: int, key: str) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners`` whose failures (host does not resolve, port in use, no
    permission) are a :class:`ListenError` for the configuration key ``key``. A ``host``
    of None means every interface."""
    shown = "*" if host is None else f"[{host}]" if ":" in host else host
    address = f"{shown}:{port}"
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except socket.gaierror as exc:
        problem = f"cannot resolve host {host!r}: {exc.strerror}"
        raise ListenError(key, problem, exc) from None
    except OSError as exc:
        problem = f"cannot listen on {address}: {_bind_reason(exc)}"
        raise ListenError(key, problem, exc) from None


def _bind_reason(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use (another process is listening there)"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "address not available (no interface on this machine has it)"
    return exc.strerror or str(exc)


# -- TLS -----------------------------------------------------------------------------------------


class TlsMaterial:
    """A node's TLS contexts, loaded and checked before anything listens or dials."""

    def __init__(
        self, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, names: frozenset[str]
    ) -> None:
        self.server_ctx = server_ctx
        self.client_ctx = client_ctx
        #: The names the node certificate proves (its CN and DNS SANs).
        self.names = names


def load_tls(cert: Path, key: Path, ca: Path) -> TlsMaterial:
    """Read and check the three TLS files, then build the server and client contexts.

    Each file is parsed on its own first, so that a problem names the file (and option) at
    fault: OpenSSL loads certificate and key together and says only "PEM lib" about either.
    """
    leaf = _load_certificates(cert, "tls_cert", "certificate")[0]
    private_key = _load_key(key)
    if _public_der(private_key.public_key()) != _public_der(leaf.public_key()):
        raise StartupError(
            "tls_key", f"{str(key)!r} is not the key of the certificate {str(cert)!r}"
        )
    _load_certificates(ca, "tls_ca", "CA certificate")
    try:
        server_ctx = server_context(cert, key, ca)
        client_ctx = client_context(cert, key, ca)
    except CertError as exc:  # files OpenSSL refuses although they parse
        raise StartupError("tls_cert", str(exc)) from None
    return TlsMaterial(server_ctx, client_ctx, cert_names(leaf))


def node_cert_warning(node: str, cert: Path, names: frozenset[str]) -> str | None:
    """Why peers will refuse this node's links, if its certificate does not name ``node``."""
    if node in names:
        return None
    named = ", ".join(sorted(names)) or "no name"
    return (
        f"the node certificate {cert} names {named}, not --node {node}: peers refuse links"
        f" from a node its certificate does not name (issue one with `presenced certs issue"
        f" {node}`)"
    )


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartupError(key, f"cannot read {str(path)!r}: {exc.strerror or exc}") from None


def _load_certificates(path: Path, key: str, what: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(_read(path, key))
    except ValueError:
        raise StartupError(key, f"{str(path)!r} is not a PEM {what}") from None


def _load_key(path: Path) -> PrivateKeyTypes:
    data = _read(path, "tls_key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # a password was needed
        raise StartupError(
            "tls_key", f"{str(path)!r} is encrypted; presenced needs an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise StartupError("tls_key", f"{str(path)!r} is not a PEM private key") from None


def _public_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# -- the token secret ----------------------------------------------------------------------------


def secret_file_warning(path: str | os.PathLike[str], what: str = "token secret") -> str | None:
    """Why the token secret (or API key) file is exposed, if users other than its owner may
    read it: anyone who reads it can mint tokens for any user and room (or call the server
    API)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None  # it was just read; gone now is for the next start to report
    if not mode & (stat.S_IRGRP | stat.S_IROTH):
        return None
    return (
        f"the {what} file {os.fspath(path)} has mode {mode:04o}: other users can read it"
        f" and {'mint tokens' if what == 'token secret' else 'use it'};"
        f" chmod 600 {os.fspath(path)}"
    )
