"""One peer channel over a non-blocking TLS socket: binary WebSocket messages, framed inline.

TLS is the standard library's :class:`ssl.SSLSocket` in non-blocking mode, waited on with
:func:`trio.lowlevel.wait_readable` / ``wait_writable``: OpenSSL does the record layer in C,
and a message that has arrived can be read synchronously (``receive_nowait``: the gossip
layer reads near peers once per tick with it). trio's ``SSLStream`` runs the same OpenSSL
through memory BIOs in Python: ~60 µs more CPU per message here, and no way to read without
awaiting; see ``bench/peer_channel_cost.py``. Plain binary frames are read and written
directly; wsproto runs control frames, fragments and protocol errors (see
:mod:`presenced.core.ws_frames`). The transport that dials and accepts these channels is
:mod:`presenced.server.peers.tls`.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
from collections import deque
from collections.abc import Callable

import trio
from wsproto import WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import LocalProtocolError

from presenced.certs import cert_names
from presenced.core.ws_frames import CloseCode, binary_frame, binary_payload, frame_header
from presenced.server.peers.transport import ChannelClosed

__all__ = ["TlsPeerChannel", "reason"]

#: Bytes asked of the socket per read, and offered to it per write.
_RECEIVE_BYTES = 65_536
_WRITE_BYTES = 262_144


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
        close_timeout_s: float,
        on_close: Callable[[TlsPeerChannel], object] | None = None,
    ) -> None:
        self._sock = sock
        #: Told once when the channel closes (the transport forgets a dialled channel).
        self._on_close = on_close
        self._ws = ws
        self.remote_names = remote_names
        self.remote_label = remote_label
        self._max_message_bytes = max_message_bytes
        self._close_timeout_s = close_timeout_s
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
                with trio.move_on_after(self._close_timeout_s):
                    if self._ws.state is ConnectionState.OPEN:
                        with contextlib.suppress(ChannelClosed, LocalProtocolError):
                            self._out += self._ws.send(CloseConnection(code=CloseCode.NORMAL))
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
                raise self._lost(reason(exc)) from exc
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
                raise self._lost(reason(exc)) from exc
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
        self._fail(CloseCode.TOO_BIG, "message too big")
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
                self._fail(CloseCode.UNSUPPORTED_DATA, "binary messages only")
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

    def _fail(self, code: CloseCode, reason: str) -> None:
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


def reason(exc: BaseException) -> str:
    """A short human reason for a network / TLS / WebSocket failure."""
    if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError) and exc.__cause__:
        return reason(exc.__cause__)
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
