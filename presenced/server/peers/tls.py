"""The production peer transport (:mod:`~presenced.server.peers.transport`): WebSocket over mTLS.

Each region's daemon holds one certificate from the cluster's private CA
(:mod:`presenced.certs`) and uses it both to accept peers (``serve``) and to dial them
(``dial``). Both sides require and verify the other's certificate against the CA; the dialer
also checks that the server's certificate names the host it dialled. The names a verified
certificate proves (CN + DNS SANs) are handed up as ``channel.remote_names`` so the gossip
layer can check that the peer is the node it claims to be.

Structure (who owns which task):

* ``serve(handler)`` is self-contained: run it in a nursery (``await nursery.start(
  transport.serve, handler)`` returns the bound port). Every accepted connection gets its own
  task; ``handler(channel)`` runs there and the channel is closed when the handler returns. A
  peer that fails the TLS or WebSocket handshake is logged (one WARNING line) and dropped; the
  listener keeps going.
* ``dial(url)`` only works inside ``async with transport.running():``; leaving it closes every
  dialled channel still open.
* A channel has no task of its own: framing runs inline in whichever task calls ``receive``
  or ``send`` (see :class:`TlsPeerChannel` for why), and ``receive_nowait`` reads what has
  arrived without waiting (the gossip layer reads near peers once per tick with it). Plain
  binary frames are read and written directly; wsproto runs the handshake, control frames,
  fragments and protocol errors (see :mod:`presenced.core.ws_frames`).
* TLS is the standard library's :class:`ssl.SSLSocket` in non-blocking mode, waited on with
  :func:`trio.lowlevel.wait_readable` / ``wait_writable``: OpenSSL does the record layer in C,
  and a message that has arrived can be read synchronously. (trio's ``SSLStream`` runs the
  same OpenSSL through memory BIOs in Python: ~60 µs more CPU per message here, and no way to
  read without awaiting; see ``bench/peer_channel_cost.py``.)

Handshakes (TCP connect, TLS, WebSocket upgrade) are bounded by ``handshake_timeout_s``;
``aclose`` waits at most ``close_timeout_s`` for the peer to acknowledge the close. There is no
keepalive here: a peer that goes silent without closing is the gossip layer's to detect.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any, Self

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from presenced.certs import CertError
from presenced.server.peers.tls_channel import TlsPeerChannel, _Socket
from presenced.server.peers.tls_channel import reason as _reason
from presenced.server.peers.tls_contexts import PathLike, client_context, server_context
from presenced.server.peers.transport import ChannelClosed, ChannelHandler
from presenced.server.startup import open_listeners

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "SUBPROTOCOL", "TlsWebSocketTransport"]

log = logging.getLogger(__name__)

#: The WebSocket subprotocol both sides must agree on; bump it for incompatible changes.
SUBPROTOCOL = "presenced-peer.v1"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


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
        handshake_timeout_s: float = 10.0,
        close_timeout_s: float = 5.0,
    ) -> None:
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        if not (handshake_timeout_s > 0 and close_timeout_s > 0):
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
        self.handshake_timeout_s = handshake_timeout_s
        self.close_timeout_s = close_timeout_s
        #: The port ``serve`` is listening on, once it is.
        self.bound_port: int | None = None
        #: Bound by ``listen`` for the next ``serve``.
        self._listeners: list[trio.SocketListener] | None = None
        #: Dialled channels still open (an ordered set), while ``running()``; None outside it.
        self._dialled: dict[TlsPeerChannel, None] | None = None

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
        """The span in which ``dial`` works; leaving it closes every dialled channel still
        open (abruptly: the daemon is going away)."""
        if self._dialled is not None:
            raise RuntimeError("this transport is already running")
        self._dialled = {}
        try:
            yield self
        finally:
            dialled, self._dialled = self._dialled, None
            with trio.CancelScope(shield=True):
                for channel in list(dialled):
                    await channel.abort()

    async def dial(self, url: str) -> TlsPeerChannel:
        """Open a channel to the peer at ``wss://host:port[/path]``.

        Raises OSError if the TCP connection fails, ChannelClosed (with the reason) if the
        TLS or WebSocket handshake fails or takes longer than ``handshake_timeout_s``, and
        ValueError for a URL it cannot dial. Needs ``async with transport.running():``.
        """
        host, port, netloc, resource, secure = self._parse_url(url)
        if self._dialled is None:
            raise RuntimeError("dial() needs `async with transport.running():` around it")
        with trio.move_on_after(self.handshake_timeout_s) as connect_scope:
            tcp = await trio.open_tcp_stream(host, port)
        if connect_scope.cancelled_caught:
            raise TimeoutError(f"cannot connect to {url}: timed out")
        sock = _Socket.adopt(tcp)
        label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        names: frozenset[str] | None = None
        try:
            with trio.fail_after(self.handshake_timeout_s):
                if secure:
                    assert self.client_ctx is not None
                    names = await sock.start_tls(
                        self.client_ctx, server_side=False, server_hostname=host
                    )
                # With TLS 1.3 the server checks our certificate after our handshake is done,
                # so a refusal shows up here, as the connection dropping.
                hint = " (did the peer refuse our certificate?)" if secure else ""
                ws = await self._upgrade_client(sock, netloc, resource, hint)
        except BaseException as exc:
            sock.close()
            reason = _failure_reason(exc)
            if reason is None:
                raise
            raise ChannelClosed(f"cannot connect to {url}: {reason}") from exc
        if self._dialled is None:  # running() ended during the handshake
            sock.close()
            raise ChannelClosed(f"cannot connect to {url}: the transport stopped")
        channel = self._channel(sock, ws, names, label, on_close=self._forget)
        self._dialled[channel] = None
        return channel

    def _forget(self, channel: TlsPeerChannel) -> None:
        if self._dialled is not None:
            self._dialled.pop(channel, None)

    async def _upgrade_client(
        self, sock: _Socket, netloc: str, resource: str, hint: str
    ) -> WSConnection:
        ws = WSConnection(ConnectionType.CLIENT)
        request = Request(host=netloc, target=resource, subprotocols=[self.subprotocol])
        await sock.send_all(ws.send(request))
        rejected: RejectConnection | None = None
        body = b""
        while True:
            data = await _receive_or_break(sock, hint)
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    if event.subprotocol != self.subprotocol:
                        raise ChannelClosed(f"peer did not accept subprotocol {self.subprotocol!r}")
                    return ws
                if isinstance(event, RejectConnection):
                    rejected = event
                    if not event.has_body:
                        raise ChannelClosed(_rejection(event.status_code, b""))
                elif isinstance(event, RejectData) and rejected is not None:
                    body += event.data
                    if event.body_finished or len(body) > 4096:
                        raise ChannelClosed(_rejection(rejected.status_code, body))

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

    async def listen(self) -> list[trio.SocketListener]:
        """Bind ``listen_host:listen_port`` now, for the next ``serve`` to accept on.

        The daemon binds all its listeners before it starts anything, so that an address
        it cannot use stops it before a line is logged. Failures are a ``ListenError``.
        """
        # Production's listen address is always --peer-listen's (see daemon._tls_transport).
        self._listeners = await open_listeners(self.listen_host, self.listen_port, "peer_listen")
        return self._listeners

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
        listeners, self._listeners = self._listeners, None
        if listeners is None:
            listeners = await self.listen()
            self._listeners = None
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
        sock = _Socket.adopt(tcp)
        label = sock.peer_label()
        names: frozenset[str] | None = None
        refused: str | None = None
        try:
            try:
                with trio.fail_after(self.handshake_timeout_s):
                    if self.server_ctx is not None:
                        names = await sock.start_tls(self.server_ctx, server_side=True)
                    ws = await self._upgrade_server(sock)
            except _HANDSHAKE_ERRORS as exc:
                refused = _reason(exc)
                return
            channel = self._channel(sock, ws, names, label)
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
            sock.close()

    async def _upgrade_server(self, sock: _Socket) -> WSConnection:
        ws = WSConnection(ConnectionType.SERVER)
        while True:
            data = await _receive_or_break(sock, "")
            try:
                ws.receive_data(data)
                request = next((e for e in ws.events() if isinstance(e, Request)), None)
            except RemoteProtocolError as exc:
                await _reject(sock, ws, 400, f"bad WebSocket upgrade: {exc}")
                raise ChannelClosed(f"bad WebSocket upgrade: {exc}") from None
            if request is not None:
                break
        if self.subprotocol not in request.subprotocols:
            offered = ", ".join(request.subprotocols) or "none"
            await _reject(sock, ws, 400, f"expected subprotocol {self.subprotocol}")
            raise ChannelClosed(
                f"did not offer WebSocket subprotocol {self.subprotocol!r} (offered: {offered})"
            )
        await sock.send_all(ws.send(AcceptConnection(subprotocol=self.subprotocol)))
        return ws

    def _channel(
        self,
        sock: _Socket,
        ws: WSConnection,
        names: frozenset[str] | None,
        label: str,
        on_close: Callable[[TlsPeerChannel], object] | None = None,
    ) -> TlsPeerChannel:
        return TlsPeerChannel(
            sock,
            ws,
            remote_names=names,
            remote_label=label,
            max_message_bytes=self.max_message_bytes,
            close_timeout_s=self.close_timeout_s,
            on_close=on_close,
        )


# -- plumbing ------------------------------------------------------------------------------------


async def _receive_or_break(sock: _Socket, hint: str) -> bytes:
    """Handshake bytes from the socket; ChannelClosed (with the reason) when it ends."""
    try:
        data = await sock.receive_some()
    except OSError as exc:
        raise ChannelClosed(
            f"connection broke during the WebSocket handshake: {_reason(exc)}{hint}"
        ) from exc
    if not data:
        raise ChannelClosed("connection closed during the WebSocket handshake" + hint)
    return data


async def _reject(sock: _Socket, ws: WSConnection, status: int, reason: str) -> None:
    """Answer a WebSocket upgrade with an HTTP error and a one-line body (best effort)."""
    body = (reason + "\n").encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    with contextlib.suppress(OSError, LocalProtocolError), trio.move_on_after(1):
        data = ws.send(RejectConnection(status_code=status, headers=headers, has_body=True))
        await sock.send_all(data + ws.send(RejectData(data=body)))


def _rejection(status: int, body: bytes) -> str:
    lines = body.decode("utf-8", "replace").strip().splitlines()
    detail = f": {lines[0][:200]}" if lines else ""
    return f"WebSocket upgrade rejected with HTTP {status}{detail}"


#: What a failed handshake raises (anything else is a bug and propagates).
_HANDSHAKE_ERRORS: tuple[type[Exception], ...] = (
    OSError,  # includes ssl.SSLError
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    RemoteProtocolError,
    LocalProtocolError,
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
