"""TLS contexts for peer links: this node's certificate, and only the cluster's CA trusted.

Both ends of a peer link present a certificate from the cluster's private CA
(:mod:`presenced.certs`) and require one from the other side. Loading the files here, with
no transport or daemon around, lets the start-up checks (:mod:`presenced.server.startup`)
build the contexts before anything listens or dials, and name the file at fault.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable

from presenced.certs import CertError

__all__ = ["PathLike", "client_context", "server_context"]

PathLike = str | os.PathLike[str]


def server_context(cert: PathLike, key: PathLike, ca: PathLike) -> ssl.SSLContext:
    """A context for accepting peers: TLS >= 1.2, and a client certificate from ``ca`` required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    _configure(ctx, cert, key, ca)
    return ctx


def client_context(cert: PathLike, key: PathLike, ca: PathLike) -> ssl.SSLContext:
    """A context for dialling peers: TLS >= 1.2, the server's certificate must come from ``ca``
    and name the host dialled; our own certificate is presented for client authentication."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    _configure(ctx, cert, key, ca)
    return ctx


def _configure(ctx: ssl.SSLContext, cert: PathLike, key: PathLike, ca: PathLike) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Writes never have to read (the channel relies on it: see _Socket.send_some).
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    for what, path in (("certificate", cert), ("key", key), ("CA certificate", ca)):
        _check_readable(what, path)
    try:
        # Only our CA: the system's trust store has no business vouching for a peer region.
        ctx.load_verify_locations(cafile=os.fspath(ca))
    except (ssl.SSLError, ValueError) as exc:
        raise CertError(f"cannot load CA certificate {ca}: {_ssl_reason(exc)}") from None
    try:
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key), password=_encrypted_key(key))
    except (ssl.SSLError, ValueError) as exc:
        raise CertError(
            f"cannot load certificate {cert} with key {key}: {_ssl_reason(exc)}"
        ) from None


def _check_readable(what: str, path: PathLike) -> None:
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise CertError(f"TLS {what} file {os.fspath(path)} not found") from None
    except OSError as exc:
        raise CertError(f"cannot read TLS {what} file {os.fspath(path)}: {exc.strerror}") from None


def _encrypted_key(key: PathLike) -> Callable[[], bytes]:
    # Called by OpenSSL only for an encrypted key; without it OpenSSL would prompt on the tty.
    def refuse() -> bytes:
        raise CertError(
            f"TLS key {os.fspath(key)} is encrypted; presenced needs an unencrypted key"
        )

    return refuse


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    return " ".join(str(exc).split()) or type(exc).__name__
