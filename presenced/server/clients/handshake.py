"""The server side of the WebSocket opening handshake, on wsproto over a trio stream, and the
polite end of a connection closed for what its client sent.

The framing that follows the handshake is in :mod:`presenced.core.ws_frames` (pure); the
handshake reads and writes the stream, so it lives here.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.utilities import RemoteProtocolError

from presenced.core.client_wire import SUBPROTOCOL

#: Bytes read from a socket per receive call.
RECEIVE_BYTES = 65_536

#: The blank line that ends HTTP headers, as h11 finds it.
_HEADERS_END = re.compile(b"\n\r?\n")


async def drain_input(stream: trio.abc.Stream, max_bytes: int) -> None:
    """End our side of ``stream`` and read (and ignore) what the peer still sends, until it
    hangs up or ``max_bytes``: the polite end of a connection we closed for what the peer
    sent. A socket closed with unread input is reset, and the reset makes the peer's kernel
    throw away what the peer had not read yet: the error and close frame that say why."""
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
    drained = 0
    while drained < max_bytes and (data := await stream.receive_some(RECEIVE_BYTES)):
        drained += len(data)


class HandshakeFailed(Exception):
    """The peer did not complete a valid WebSocket upgrade; the stream is done."""


async def accept_websocket(
    stream: trio.abc.Stream, *, admit: Callable[[], bool] = lambda: True
) -> tuple[WSConnection, Request, bytes]:
    """Read the HTTP upgrade request and answer it.

    Returns the wsproto connection, the request, and the bytes the client sent after its
    request in the same reads: frames it sent without waiting for the answer. The server side
    of wsproto does not keep them (it hands the connection no trailing data), so the caller
    reads them as the first input of the connection. ``admit`` is asked when the request is
    complete; if it refuses (the daemon is at its connection limit) the answer is HTTP 503.
    """
    ws = WSConnection(ConnectionType.SERVER)
    received = b""
    while True:
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            raise HandshakeFailed("connection closed during the handshake")
        received += data
        try:
            ws.receive_data(bytes(data))
            for event in ws.events():
                if isinstance(event, Request):
                    # Where h11 ends the request's headers (a GET upgrade has no body).
                    end = _HEADERS_END.search(received)
                    pipelined = received[end.end() :] if end else b""
                    answered = await _answer(stream, ws, event, not admit())
                    return (*answered, pipelined)
        except RemoteProtocolError as exc:
            await _reject(stream, ws, exc.event_hint, str(exc))
            raise HandshakeFailed(str(exc)) from exc


async def _answer(
    stream: trio.abc.Stream, ws: WSConnection, request: Request, busy: bool
) -> tuple[WSConnection, Request]:
    if busy:
        await _reject(stream, ws, RejectConnection(status_code=503), "server busy")
        raise HandshakeFailed("connection limit reached")
    subprotocol = SUBPROTOCOL if SUBPROTOCOL in request.subprotocols else None
    await stream.send_all(ws.send(AcceptConnection(subprotocol=subprotocol)))
    return ws, request


async def _reject(stream: trio.abc.Stream, ws: WSConnection, hint: object, reason: str) -> None:
    body = (reason + "\n").encode()
    reject = hint if isinstance(hint, RejectConnection) else RejectConnection(status_code=400)
    reject = RejectConnection(
        status_code=reject.status_code,
        headers=[(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
        has_body=True,
    )
    try:
        data = ws.send(reject) + ws.send(RejectData(data=body))
        with trio.move_on_after(1):
            await stream.send_all(data)
    except Exception:  # the peer is already misbehaving; nothing more to tell it
        pass
