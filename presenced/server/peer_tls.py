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

Handshakes (TCP connect, TLS, WebSocket upgrade) are bounded by ``handshake_timeout``;
``aclose`` waits at most ``close_timeout`` for the peer to acknowledge the close. There is no
keepalive here: a peer that goes silent without closing is the gossip layer's to detect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import ssl
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Self

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from presenced.certs import CertError, cert_names
from presenced.core.ws_frames import binary_frame, binary_payload, frame_header
from presenced.server.startup import open_listeners
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
#: Bytes asked of the socket per read, and offered to it per write.
_RECEIVE_BYTES = 65_536
_WRITE_BYTES = 262_144

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


# -- the socket ----------------------------------------------------------------------------------


class _Socket:
    """A connected non-blocking socket, TLS (:class:`ssl.SSLSocket`) or plain, for trio.

    Reads and writes go straight to the socket (OpenSSL's record layer in C); only when the
    socket would block does a task wait, on trio's I/O manager. Partial TLS records stay in
    OpenSSL's buffer between reads.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.closed = False
        #: Asks the kernel whether a read would find anything (bytes, the end, an error):
        #: a TLS read that finds nothing raises SSLWantReadError, which costs ~15 times this.
        self._input = select.poll()
        self._input.register(sock.fileno(), select.POLLIN)

    @classmethod
    def adopt(cls, tcp: trio.SocketStream) -> _Socket:
        """Take the OS socket out of a trio stream (which is left closed)."""
        fd = tcp.socket.detach()
        return cls(socket.socket(fileno=fd))

    async def start_tls(
        self, ctx: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> frozenset[str]:
        """The TLS handshake; returns the names the peer's verified certificate proves."""
        tls = ctx.wrap_socket(
            self.sock,
            server_side=server_side,
            server_hostname=server_hostname,
            do_handshake_on_connect=False,
        )
        tls.setblocking(False)
        self.sock = tls
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(tls)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(tls)
        peercert = tls.getpeercert()
        if not peercert:  # cannot happen with CERT_REQUIRED; never hand up "verified" for it
            raise ChannelClosed("peer presented no certificate")
        return cert_names(peercert)

    def receive_nowait(self) -> bytes | None:
        """What has arrived (up to ``_RECEIVE_BYTES``); None if nothing has, b"" at the end.

        Raises OSError (ssl.SSLError included) if the connection broke.
        """
        sock = self.sock
        # Nothing new from the kernel: only what OpenSSL already decrypted can be read.
        quiet = not self.closed and not self._input.poll(0)
        if quiet and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            return None
        try:
            return sock.recv(_RECEIVE_BYTES)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return None
        except ssl.SSLWantWriteError:
            return None  # (renegotiation is off; a KeyUpdate's reply goes with our next send)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""

    async def receive_some(self) -> bytes:
        """The next bytes that arrive; b"" at the end of the stream."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            data = self.receive_nowait()
            if data is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            await trio.lowlevel.wait_readable(self.sock)

    async def send_all(self, data: bytes) -> None:
        """Write all of ``data`` (the handshakes; a channel writes through its own buffer)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while data:
            written = self.send_some(data)
            if written is None:  # (retried with the same bytes, as OpenSSL requires)
                await trio.lowlevel.wait_writable(self.sock)
            else:
                data = data[written:]
        await trio.lowlevel.cancel_shielded_checkpoint()

    def send_some(self, data: bytes) -> int | None:
        """Write what the socket takes now; the number of bytes taken, or None if it would
        block (then a TLS socket must be offered the same bytes again, as OpenSSL requires)."""
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
            return None
        except ssl.SSLWantReadError:
            raise OSError("TLS wants to read during a write (renegotiation?)") from None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()

    def peer_label(self) -> str:
        try:
            host, port, *_ = self.sock.getpeername()
        except (OSError, ValueError):
            return "unknown peer"
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


# -- the channel ---------------------------------------------------------------------------------


class TlsPeerChannel:
    """One peer link: binary WebSocket messages over (usually) mutually authenticated TLS.

    Framing runs inline in the calling tasks: ``receive`` (or ``receive_nowait``) reads the
    socket and parses frames itself, ``send`` frames and writes. There is no reader task and no
    channel between it and the caller (trio-websocket cost ~230 µs of CPU per small message
    here; see ``bench/peer_channel_cost.py``), and a peer message wakes one task, not two.
    One task may receive while others send (sends are serialised by a lock).
    """

    def __init__(
        self,
        sock: _Socket,
        ws: WSConnection,
        *,
        remote_names: frozenset[str] | None,
        remote_label: str,
        max_message_bytes: int,
        close_timeout: float,
        on_close: Callable[[TlsPeerChannel], object] | None = None,
    ) -> None:
        self._sock = sock
        #: Told once when the channel closes (the transport forgets a dialled channel).
        self._on_close = on_close
        self._ws = ws
        self.remote_names = remote_names
        self.remote_label = remote_label
        self._max_message_bytes = max_message_bytes
        self._close_timeout = close_timeout
        self._messages: deque[bytes] = deque()
        #: Bytes read that do not make a whole frame yet (wsproto only ever gets whole frames).
        self._inbox = bytearray()
        self._parts: list[bytes] = []
        self._size = 0
        #: Held by a task waiting for the socket to take ``_out``.
        self._send_lock = trio.Lock()
        self._receiving = False
        #: Frames not yet written, in order. Reading only ever appends here (pongs for the
        #: peer's WebSocket pings): it never blocks on a full socket, or two peers both
        #: writing big messages would stop reading each other for good.
        self._out = bytearray()
        #: The bytes a TLS write that would have blocked must be retried with.
        self._retry: bytes | None = None
        #: Why the channel is gone (None while it is open).
        self._gone: str | None = None
        #: The peer's close, once read: raised when the messages before it have been taken.
        self._closing: str | None = None

    def __repr__(self) -> str:
        names = "unauthenticated" if self.remote_names is None else sorted(self.remote_names)
        return f"<TlsPeerChannel {self.remote_label} {names}>"

    async def send(self, data: bytes) -> None:
        """Send one binary message; raises ChannelClosed once the channel is gone.

        A message bigger than ``max_message_bytes`` raises ValueError (the peer would drop
        the link for it) and the channel stays usable. When the socket takes the message at
        once, this returns without yielding to the scheduler (a cancelled caller still gets
        Cancelled).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._queue(data)
        await self.flush()

    def send_nowait(self, data: bytes) -> bool:
        """Queue one message and write what the socket takes now, never waiting. True if it
        all went; otherwise the rest goes out with the next ``send`` or ``flush``. Raises
        like ``send``."""
        self._queue(data)
        return not self._send_lock.locked() and self._pump()

    async def flush(self) -> None:
        """Wait until everything queued is written; raises ChannelClosed if the channel goes."""
        if self._send_lock.locked() or not self._pump():
            async with self._send_lock:
                while not self._pump():
                    try:
                        await trio.lowlevel.wait_writable(self._sock.sock)
                    except trio.ClosedResourceError:
                        raise self._lost("connection closed") from None

    async def receive(self) -> bytes:
        """The next message; raises ChannelClosed once the channel is gone.

        A text message breaks the protocol: the channel is closed and ChannelClosed raised.
        So does a message over ``max_message_bytes`` (close code 1009). Messages that came
        before the peer's close are all handed out before ChannelClosed is raised.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        messages = self._messages
        if messages:
            return messages.popleft()
        self._receiving = True
        try:
            while not self._read_available():
                try:
                    await trio.lowlevel.wait_readable(self._sock.sock)
                except trio.ClosedResourceError:
                    self._check_open()
                    raise self._lost("connection closed") from None
        finally:
            self._receiving = False
        return messages.popleft()

    def input_fd(self) -> int | None:
        return None if self._sock.closed else self._sock.sock.fileno()

    def receive_nowait(self) -> bytes | None:
        """The next message if it has arrived, else None (never waits); raises ChannelClosed
        once the channel is gone, like ``receive``."""
        messages = self._messages
        if messages or self._read_available():
            return messages.popleft()
        return None

    async def aclose(self) -> None:
        """Close the channel (idempotent), waiting a little for the peer to acknowledge.

        The socket is closed however this ends, cancelled included. (There is no TLS
        close_notify: the WebSocket close handshake is what ends a link, and the peer reads
        the end of the stream as such.)
        """
        try:
            if self._gone is None:
                self._gone = "closed by this side"
                with trio.move_on_after(self._close_timeout):
                    if self._ws.state is ConnectionState.OPEN:
                        with contextlib.suppress(ChannelClosed, LocalProtocolError):
                            self._out += self._ws.send(CloseConnection(code=1000))
                            await self.flush()
                    if not self._receiving:
                        await self._await_close_reply()
        finally:
            self._close_now()
        await trio.lowlevel.checkpoint()

    async def abort(self) -> None:
        """Close at once, without a close handshake (the daemon is going away)."""
        self._close_now()
        await trio.lowlevel.checkpoint()

    def _close_now(self) -> None:
        self._gone = self._gone or "closed by this side"
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close(self)
        self._sock.close()

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._gone is not None:
            raise ChannelClosed(f"link to {self.remote_label} closed: {self._gone}")

    def _lost(self, reason: str) -> ChannelClosed:
        self._gone = self._gone or reason
        return ChannelClosed(f"link to {self.remote_label} closed: {reason}")

    def _queue(self, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"peer messages are bytes, not {type(data).__name__}")
        if len(data) > self._max_message_bytes:
            raise ValueError(
                f"message of {len(data)} bytes exceeds the limit of {self._max_message_bytes}"
            )
        self._check_open()
        data = bytes(data)
        if self._ws.state is ConnectionState.OPEN:
            self._out += binary_frame(data, os.urandom(4) if self._ws.client else None)
        else:
            self._out += self._ws.send(BytesMessage(data=data))  # (raises: not open)

    def _pump(self) -> bool:
        """Write ``_out`` as far as the socket takes it now; True once it is empty. Only one
        task may be in here at a time: the ``_send_lock`` holder, or anyone while it is free."""
        out = self._out
        while out:
            chunk = self._retry if self._retry is not None else bytes(out[:_WRITE_BYTES])
            try:
                written = self._sock.send_some(chunk)
            except OSError as exc:
                raise self._lost(_reason(exc)) from exc
            if written is None:
                self._retry = chunk
                return False
            self._retry = None
            del out[:written]
        return True

    def _read_available(self) -> bool:
        """Read what the socket has into complete messages; True once one is queued.

        What the peer sent before its close frame is handed out first; the close (kept in
        ``_closing``) is raised once those messages are taken.
        """
        while not self._messages:
            if self._closing is not None:
                raise self._lost(self._closing)
            self._check_open()
            try:
                data = self._sock.receive_nowait()
            except OSError as exc:
                raise self._lost(_reason(exc)) from exc
            if data is None:
                return False
            if not data:
                raise self._lost("connection closed")
            self._take(data)
        return True

    def _take(self, data: bytes) -> None:
        """Split what was read into whole frames: a plain binary frame is a message as it
        stands, any other frame goes to wsproto (whole, so wsproto never holds part of one)."""
        buffer: bytes | bytearray = data
        if self._inbox:
            self._inbox += data
            buffer = self._inbox
        masked = not self._ws.client  # (a client's frames are masked, a server's are not)
        at, size = 0, len(buffer)
        while at < size and self._closing is None:
            header = frame_header(buffer, at)
            if header is None:
                break
            start, length, _ = header
            if length > self._max_message_bytes:
                self._too_big()
            end = start + length
            if end > size:
                break
            plain = not self._parts and self._ws.state is ConnectionState.OPEN
            payload = binary_payload(buffer, at, header, masked) if plain else None
            if payload is not None:
                self._messages.append(payload)
            else:
                self._ws.receive_data(bytes(buffer[at:end]))
                self._handle_events()
            at = end
        if at >= size or self._closing is not None:
            self._inbox.clear()
        elif buffer is self._inbox:
            del self._inbox[:at]  # (nothing moves while a big frame is still arriving)
        else:
            self._inbox = bytearray(buffer[at:])

    def _too_big(self) -> None:
        self._fail(1009, "message too big")
        raise self._lost(f"{self.remote_label} sent a message over {self._max_message_bytes} bytes")

    def _handle_events(self) -> None:
        for event in self._ws.events():
            if isinstance(event, BytesMessage):
                self._size += len(event.data)
                if self._size > self._max_message_bytes:
                    self._too_big()
                self._parts.append(bytes(event.data))
                if event.message_finished:
                    parts, self._parts, self._size = self._parts, [], 0
                    self._messages.append(parts[0] if len(parts) == 1 else b"".join(parts))
            elif isinstance(event, TextMessage):
                self._fail(1003, "binary messages only")
                raise self._lost(f"{self.remote_label} sent a text message; link closed")
            elif isinstance(event, Ping):
                if len(self._out) < _WRITE_BYTES:  # (a peer pinging faster than we write)
                    self._out += self._ws.send(event.response())
            elif isinstance(event, CloseConnection):
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    self._send_best_effort(self._ws.send(event.response()))
                detail = f" ({event.reason})" if event.reason else ""
                self._closing = f"closed with code {event.code}{detail}"
                return

    def _fail(self, code: int, reason: str) -> None:
        """Protocol breach by the peer: send a close frame (best effort), then give up."""
        if self._ws.state is ConnectionState.OPEN:
            with contextlib.suppress(LocalProtocolError):
                self._send_best_effort(self._ws.send(CloseConnection(code=code, reason=reason)))

    def _send_best_effort(self, frame: bytes) -> None:
        """A last frame on a channel being given up: what the socket takes now, if no task is
        waiting to write (never waits: the reader must not block on a full socket)."""
        self._out += frame
        if not self._send_lock.locked():
            with contextlib.suppress(ChannelClosed):
                self._pump()

    async def _await_close_reply(self) -> None:
        """After our close frame: read until the peer's close (or the end of the stream)."""
        if self._inbox:  # (the start of a frame: wsproto reads on from there)
            self._ws.receive_data(bytes(self._inbox))
            self._inbox.clear()
        while self._ws.state is not ConnectionState.CLOSED:
            try:
                data = await self._sock.receive_some()
            except (OSError, trio.ClosedResourceError):
                return
            if not data:
                return
            self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, CloseConnection):
                    return


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
        TLS or WebSocket handshake fails or takes longer than ``handshake_timeout``, and
        ValueError for a URL it cannot dial. Needs ``async with transport.running():``.
        """
        host, port, netloc, resource, secure = self._parse_url(url)
        if self._dialled is None:
            raise RuntimeError("dial() needs `async with transport.running():` around it")
        with trio.move_on_after(self.handshake_timeout) as connect_scope:
            tcp = await trio.open_tcp_stream(host, port)
        if connect_scope.cancelled_caught:
            raise TimeoutError(f"cannot connect to {url}: timed out")
        sock = _Socket.adopt(tcp)
        label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        names: frozenset[str] | None = None
        try:
            with trio.fail_after(self.handshake_timeout):
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
                with trio.fail_after(self.handshake_timeout):
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
            close_timeout=self.close_timeout,
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
    if isinstance(exc, trio.BrokenResourceError):
        return "connection broken"
    if isinstance(exc, trio.ClosedResourceError):
        return "connection closed"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
