"""The production :class:`~presenced.server.transport.PeerTransport`: WebSocket over mutual TLS.

Each region's daemon holds one certificate from the cluster's private CA
(:mod:`presenced.certs`) and uses it both to accept peers (``serve``) and to dial them
(``dial``). Both sides require and verify the other's certificate against the CA; the dialer
also checks that the server's certificate names the host it dialled. The names a verified
certificate proves (CN + DNS SANs) are handed up as ``channel.remote_names`` so the gossip
layer can check that the peer is the node it claims to be.

Structure (who owns which task):

* ``serve(handler)`` is self-contained: run it in a nursery (``await nursery.start(
  transport.serve, handler)`` returns the bound port). Every accepted connection gets its own
  task and, inside it, its own nursery for trio-websocket's reader task; ``handler(channel)``
  runs there and the channel is closed when the handler returns. A peer that fails the TLS or
  WebSocket handshake is logged (one WARNING line) and dropped; the listener keeps going.
* ``dial(url)`` needs a place for the reader task of a channel that outlives the call, so it
  only works inside ``async with transport.running():``. Each dialled channel lives in its own
  task in that nursery until it is closed (by either side or by the network); leaving
  ``running()`` closes every channel still open.

Handshakes (TCP connect, TLS, WebSocket upgrade) are bounded by ``handshake_timeout``;
``aclose`` waits at most ``close_timeout`` for the peer to acknowledge the close. There is no
keepalive here: a peer that goes silent without closing is the gossip layer's to detect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any, Self

import trio
import trio_websocket
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
    wrap_server_stream,
)

from presenced.certs import CertError, cert_names
from presenced.server.transport import ChannelClosed, ChannelHandler

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "SUBPROTOCOL",
    "TlsPeerChannel",
    "TlsWebSocketTransport",
    "client_context",
    "server_context",
]

log = logging.getLogger(__name__)

#: The WebSocket subprotocol both sides must agree on; bump it for incompatible changes.
SUBPROTOCOL = "presenced-peer.v1"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: Bytes asked of the stream per read by trio-websocket's reader (its default is 4 KiB).
_RECEIVE_BYTES = 65_536

PathLike = str | os.PathLike[str]


# -- TLS contexts --------------------------------------------------------------------------------


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


# -- the channel ---------------------------------------------------------------------------------


class TlsPeerChannel:
    """One peer link: binary WebSocket messages over (usually) mutually authenticated TLS."""

    def __init__(
        self,
        ws: WebSocketConnection,
        *,
        remote_names: frozenset[str] | None,
        remote_label: str,
        max_message_bytes: int,
        close_timeout: float,
    ) -> None:
        self._ws = ws
        self.remote_names = remote_names
        self.remote_label = remote_label
        self._max_message_bytes = max_message_bytes
        self._close_timeout = close_timeout

    def __repr__(self) -> str:
        names = "unauthenticated" if self.remote_names is None else sorted(self.remote_names)
        return f"<TlsPeerChannel {self.remote_label} {names}>"

    async def send(self, data: bytes) -> None:
        """Send one binary message; raises ChannelClosed once the channel is gone.

        A message bigger than ``max_message_bytes`` raises ValueError (the peer would drop
        the link for it) and the channel stays usable.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"peer messages are bytes, not {type(data).__name__}")
        if len(data) > self._max_message_bytes:
            raise ValueError(
                f"message of {len(data)} bytes exceeds the limit of {self._max_message_bytes}"
            )
        try:
            await self._ws.send_message(bytes(data))
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ChannelClosed(f"link to {self.remote_label} closed: {_reason(exc)}") from exc

    async def receive(self) -> bytes:
        """The next message; raises ChannelClosed once the channel is gone.

        A text message breaks the protocol: the channel is closed and ChannelClosed raised.
        """
        try:
            message = await self._ws.get_message()
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ChannelClosed(f"link to {self.remote_label} closed: {_reason(exc)}") from exc
        if not isinstance(message, bytes):
            await self._close(1003, "binary messages only")
            raise ChannelClosed(f"{self.remote_label} sent a text message; link closed")
        return message

    async def aclose(self) -> None:
        """Close the channel (idempotent), waiting a little for the peer to acknowledge."""
        await self._close(1000, None)

    async def _close(self, code: int, reason: str | None) -> None:
        # trio-websocket waits for the peer's close frame without a limit; on timeout its
        # cleanup still closes the underlying stream.
        with trio.move_on_after(self._close_timeout):
            await self._ws.aclose(code, reason)


# -- the transport -------------------------------------------------------------------------------


class TlsWebSocketTransport:
    """Dials and accepts peer channels: WebSocket (``wss://``) over mutually authenticated TLS.

    ``server_ctx`` / ``client_ctx`` come from :func:`server_context` / :func:`client_context`
    (or use :meth:`from_files`). With ``allow_plain=True`` (local experiments only) ``ws://``
    URLs may be dialled and, without a ``server_ctx``, ``serve`` accepts plain WebSocket;
    such channels have ``remote_names=None`` (nothing proven).
    """

    def __init__(
        self,
        *,
        listen_host: str | None = "127.0.0.1",
        listen_port: int | None = 0,
        server_ctx: ssl.SSLContext | None = None,
        client_ctx: ssl.SSLContext | None = None,
        subprotocol: str = SUBPROTOCOL,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        allow_plain: bool = False,
        handshake_timeout: float = 10.0,
        close_timeout: float = 5.0,
    ) -> None:
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        if not (handshake_timeout > 0 and close_timeout > 0):
            raise ValueError("timeouts must be positive")
        if not allow_plain and server_ctx is None and client_ctx is None:
            raise ValueError("give server_ctx and/or client_ctx, or allow_plain=True")
        self.listen_host = listen_host
        self.listen_port = listen_port or 0
        self.server_ctx = server_ctx
        self.client_ctx = client_ctx
        self.subprotocol = subprotocol
        self.max_message_bytes = max_message_bytes
        self.allow_plain = allow_plain
        self.handshake_timeout = handshake_timeout
        self.close_timeout = close_timeout
        #: The port ``serve`` is listening on, once it is.
        self.bound_port: int | None = None
        self._nursery: trio.Nursery | None = None

    @classmethod
    def from_files(
        cls, *, cert: PathLike, key: PathLike, ca: PathLike, **kwargs: Any
    ) -> TlsWebSocketTransport:
        """A transport whose server and client contexts both use this node's cert and the CA."""
        return cls(
            server_ctx=server_context(cert, key, ca),
            client_ctx=client_context(cert, key, ca),
            **kwargs,
        )

    # -- dialling ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Self]:
        """Hold the nursery that dialled channels live in; ``dial`` only works inside.

        Leaving the block closes every dialled channel still open.
        """
        if self._nursery is not None:
            raise RuntimeError("this transport is already running")
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield self
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    async def dial(self, url: str) -> TlsPeerChannel:
        """Open a channel to the peer at ``wss://host:port[/path]``.

        Raises OSError if the TCP connection fails, ChannelClosed (with the reason) if the
        TLS or WebSocket handshake fails or takes longer than ``handshake_timeout``, and
        ValueError for a URL it cannot dial. Needs ``async with transport.running():``.
        """
        host, port, netloc, resource, secure = self._parse_url(url)
        nursery = self._nursery
        if nursery is None:
            raise RuntimeError("dial() needs `async with transport.running():` around it")
        with trio.move_on_after(self.handshake_timeout) as connect_scope:
            tcp = await trio.open_tcp_stream(host, port)
        if connect_scope.cancelled_caught:
            raise TimeoutError(f"cannot connect to {url}: timed out")
        stream: trio.abc.Stream = tcp
        label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        names: frozenset[str] | None = None
        try:
            with trio.fail_after(self.handshake_timeout):
                if secure:
                    assert self.client_ctx is not None
                    ssl_stream = trio.SSLStream(tcp, self.client_ctx, server_hostname=host)
                    stream = ssl_stream
                    await ssl_stream.do_handshake()
                    names = _peer_names(ssl_stream)
                # With TLS 1.3 the server checks our certificate after our handshake is done,
                # so a refusal shows up here, as the connection dropping.
                hint = " (did the peer refuse our certificate?)" if secure else ""
                watched = _WatchedStream(stream, hint=hint)
                stream = watched
                ws: WebSocketConnection = await nursery.start(
                    self._host_client, watched, netloc, resource, label
                )
        except BaseException as exc:
            reason = _failure_reason(exc)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            if reason is None:
                raise
            raise ChannelClosed(f"cannot connect to {url}: {reason}") from exc
        return self._channel(ws, names, label)

    async def _host_client(
        self,
        watched: _WatchedStream,
        netloc: str,
        resource: str,
        label: str,
        *,
        task_status: trio.TaskStatus[WebSocketConnection] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run one dialled channel's reader task until the connection ends."""
        started = False
        try:
            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as handshake:
                    watched.on_break = handshake.cancel
                    ws = await wrap_client_stream(
                        nursery,
                        watched,  # type: ignore[arg-type]  # any trio Stream works
                        netloc,
                        resource,
                        subprotocols=[self.subprotocol],
                        max_message_size=self.max_message_bytes,
                        receive_buffer_size=_RECEIVE_BYTES,
                    )
                watched.on_break = None
                if handshake.cancelled_caught:
                    raise ChannelClosed(watched.break_reason)
                if ws.subprotocol != self.subprotocol:
                    await trio.aclose_forcefully(watched)
                    raise ChannelClosed(f"peer did not accept subprotocol {self.subprotocol!r}")
                task_status.started(ws)
                started = True
        except BaseException as exc:
            reason = _failure_reason(exc)
            if not started or reason is None:
                raise
            log.debug("peer link to %s ended: %s", label, reason)
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(watched)

    def _parse_url(self, url: str) -> tuple[str, int, str, str, bool]:
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            raise ValueError(f"bad peer URL {url!r}") from None
        if parts.scheme not in ("ws", "wss") or not parts.hostname or not port:
            raise ValueError(f"bad peer URL {url!r}: expected wss://host:port[/path]")
        if parts.scheme == "ws" and not self.allow_plain:
            raise ValueError(f"refusing to dial {url!r}: plain ws:// needs allow_plain=True")
        if parts.scheme == "wss" and self.client_ctx is None:
            raise ValueError(f"cannot dial {url!r}: this transport has no client TLS context")
        netloc = parts.netloc.rpartition("@")[2]
        resource = parts.path or "/"
        if parts.query:
            resource += "?" + parts.query
        return parts.hostname, port, netloc, resource, parts.scheme == "wss"

    # -- accepting ---------------------------------------------------------------------------

    async def serve(
        self,
        handler: ChannelHandler,
        *,
        # Typed like PeerTransport.serve's (``object``) would be, but usable: a trio.TaskStatus.
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept peers on ``listen_host:listen_port`` forever, running ``handler(channel)``
        for each in its own task (the channel is closed when it returns).

        Calls ``task_status.started(port)`` with the bound port once accepting. A handler that
        lets ChannelClosed escape is fine (logged at DEBUG); any other exception from it
        propagates and ends ``serve``.
        """
        if self.server_ctx is None and not self.allow_plain:
            raise RuntimeError("serve() needs a server TLS context (or allow_plain=True)")
        listeners = await trio.open_tcp_listeners(self.listen_port, host=self.listen_host)
        port = int(listeners[0].socket.getsockname()[1])
        self.bound_port = port
        scheme = "wss" if self.server_ctx is not None else "ws"
        log.info("accepting peers on %s://%s:%d", scheme, self.listen_host or "*", port)

        async def accept(stream: trio.SocketStream) -> None:
            await self._accept(stream, handler)

        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, accept, listeners)
            task_status.started(port)

    async def _accept(self, tcp: trio.SocketStream, handler: ChannelHandler) -> None:
        label = _address_label(tcp)
        stream: trio.abc.Stream = tcp
        names: frozenset[str] | None = None
        refused: str | None = None
        try:
            if self.server_ctx is not None:
                ssl_stream = trio.SSLStream(tcp, self.server_ctx, server_side=True)
                stream = ssl_stream
                try:
                    with trio.fail_after(self.handshake_timeout):
                        await ssl_stream.do_handshake()
                    names = _peer_names(ssl_stream)
                except _HANDSHAKE_ERRORS as exc:
                    refused = _reason(exc)
                    return
            watched = _WatchedStream(stream)
            stream = watched
            async with trio.open_nursery() as nursery:
                try:
                    ws = await self._upgrade_server(nursery, watched)
                except _HANDSHAKE_ERRORS as exc:
                    refused = _reason(exc)
                    nursery.cancel_scope.cancel()
                    return
                channel = self._channel(ws, names, label)
                log.debug("peer connection from %s accepted: %r", label, channel)
                try:
                    await handler(channel)
                except BaseException as exc:
                    if not _only_channel_closed(exc):
                        raise
                    log.debug("peer link from %s ended: %s", label, exc)
                finally:
                    with trio.CancelScope(shield=True):
                        await channel.aclose()
        finally:
            if refused is not None:
                log.warning("refused peer connection from %s: %s", label, refused)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _upgrade_server(
        self, nursery: trio.Nursery, watched: _WatchedStream
    ) -> WebSocketConnection:
        with trio.fail_after(self.handshake_timeout):
            with trio.CancelScope() as handshake:
                watched.on_break = handshake.cancel
                request = await wrap_server_stream(
                    nursery,
                    watched,
                    max_message_size=self.max_message_bytes,
                    receive_buffer_size=_RECEIVE_BYTES,
                )
            watched.on_break = None
            if handshake.cancelled_caught:
                raise ChannelClosed(watched.break_reason)
            if self.subprotocol not in request.proposed_subprotocols:
                offered = ", ".join(request.proposed_subprotocols) or "none"
                await request.reject(
                    400, body=f"expected subprotocol {self.subprotocol}\n".encode()
                )
                raise ChannelClosed(
                    f"did not offer WebSocket subprotocol {self.subprotocol!r} (offered: {offered})"
                )
            return await request.accept(subprotocol=self.subprotocol)

    def _channel(
        self, ws: WebSocketConnection, names: frozenset[str] | None, label: str
    ) -> TlsPeerChannel:
        return TlsPeerChannel(
            ws,
            remote_names=names,
            remote_label=label,
            max_message_bytes=self.max_message_bytes,
            close_timeout=self.close_timeout,
        )


# -- plumbing ------------------------------------------------------------------------------------


class _WatchedStream(trio.abc.Stream):
    """A stream that reports when it breaks, so a WebSocket handshake waiting on it can stop.

    trio-websocket's ``wrap_*_stream`` wait for the handshake without noticing that the reader
    task died (e.g. with TLS 1.3 a server refuses a client certificate only after the client's
    handshake has finished, so the dialler learns it on its first read): they would hang until
    the timeout. ``on_break`` is called on the first read or write failure or end of stream.
    """

    def __init__(self, inner: trio.abc.Stream, *, hint: str = "") -> None:
        self.inner = inner
        self.on_break: Callable[[], None] | None = None
        self._hint = hint
        self.break_reason = "connection closed during the WebSocket handshake" + hint

    def _broken(self, exc: BaseException | None) -> None:
        if exc is not None:
            self.break_reason = (
                f"connection broke during the WebSocket handshake: {_reason(exc)}{self._hint}"
            )
        if self.on_break is not None:
            on_break, self.on_break = self.on_break, None
            on_break()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.inner.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._broken(exc)
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._broken(exc)
            raise
        if not data:
            self._broken(None)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


#: What a failed handshake raises (anything else is a bug and propagates).
_HANDSHAKE_ERRORS: tuple[type[Exception], ...] = (
    OSError,  # includes ssl.SSLError
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    ConnectionClosed,
    HandshakeError,  # includes ConnectionRejected
    ChannelClosed,
    CertError,
)


def _failure_reason(exc: BaseException) -> str | None:
    """A one-line reason if ``exc`` (or every leaf of an exception group) is an expected
    network/handshake failure, else None (re-raise it: a bug, or a cancellation)."""
    if isinstance(exc, BaseExceptionGroup):
        reasons = [_failure_reason(sub) for sub in exc.exceptions]
        if not reasons or any(reason is None for reason in reasons):
            return None
        return "; ".join(dict.fromkeys(r for r in reasons if r))
    if isinstance(exc, _HANDSHAKE_ERRORS):
        return _reason(exc)
    return None


def _only_channel_closed(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_channel_closed(sub) for sub in exc.exceptions)
    return isinstance(exc, ChannelClosed)


def _reason(exc: BaseException) -> str:
    """A short human reason for a network / TLS / WebSocket failure."""
    if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError) and exc.__cause__:
        return _reason(exc.__cause__)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        detail = str(exc.reason).replace("_", " ").lower() if exc.reason else str(exc)
        return f"TLS error: {detail}"
    if isinstance(exc, trio.TooSlowError):
        return "handshake timed out"
    if isinstance(exc, trio_websocket.ConnectionRejected):
        body = (exc.body or b"").decode("utf-8", "replace").strip().splitlines()
        detail = f": {body[0][:200]}" if body else ""
        return f"WebSocket upgrade rejected with HTTP {exc.status_code}{detail}"
    if isinstance(exc, ConnectionClosed):
        reason = exc.reason
        if reason is None:
            return "connection closed"
        return f"closed with code {reason.code}" + (f" ({reason.reason})" if reason.reason else "")
    if isinstance(exc, trio.BrokenResourceError):
        return "connection broken"
    if isinstance(exc, trio.ClosedResourceError):
        return "connection closed"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _peer_names(ssl_stream: trio.SSLStream[Any]) -> frozenset[str]:
    peercert = ssl_stream.getpeercert()
    if not peercert:  # cannot happen with CERT_REQUIRED, but never hand up "verified" for it
        raise ChannelClosed("peer presented no certificate")
    return cert_names(peercert)


def _address_label(tcp: trio.SocketStream) -> str:
    try:
        host, port, *_ = tcp.socket.getpeername()
    except (OSError, ValueError):
        return "unknown peer"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
