"""The server side of the WebSocket handshake and framing, on wsproto over a trio stream.

The client service does not use trio-websocket's connection object: that adds a reader task
and a channel hop per message (measured at ~100 µs of CPU per paced message on a 2-vCPU VM),
and the hot path here is thousands of small frames per second. Instead each connection's own
task feeds bytes to wsproto's sans-I/O state machine and handles events inline.

Server frames are unmasked and we negotiate no extensions, so one encoded frame is valid on
every connection: a room diff is encoded once and the same bytes are written to every member.

Client frames: what a client sends is almost always whole, small, final, masked text frames
(one JSON request each). :func:`complete_text_messages` reads exactly that case in a few
microseconds (wsproto takes ~32 µs of CPU per such frame here, the largest single cost of a
cursor update); anything else (a partial frame, a control frame, fragmentation, a bad header,
invalid UTF-8) returns None, and the connection hands that read, and every later one, to
wsproto, which either handles it or closes with the right code. So the fast path only ever
accepts what wsproto would accept, with the same result (a property test checks this).

Peer links (:mod:`presenced.server.peers.tls_channel`) carry one binary message per tick each
way, and wsproto took 25-37 µs of CPU to read one and 11-22 µs to frame one. So they split what they
read into whole frames (:func:`frame_header`), take a final binary frame's payload directly
(:func:`binary_payload`), and hand any other frame to wsproto whole; they frame what they send
with :func:`binary_frame`. wsproto still runs the handshake, control frames, fragments and
every protocol error, and since it is only ever given whole frames, it never holds part of
one, so the next plain frame may again skip it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.frame_protocol import FrameProtocol, XorMaskerSimple
from wsproto.utilities import RemoteProtocolError

from presenced.core import protocol

#: The subprotocol a client may offer to pin the protocol version.
SUBPROTOCOL = "presenced.v1"
#: Bytes read from a socket per receive call.
RECEIVE_BYTES = 65_536

_framer = FrameProtocol(client=False, extensions=[])
#: The blank line that ends HTTP headers, as h11 finds it.
_HEADERS_END = re.compile(b"\n\r?\n")


def message_frame(message: dict[str, Any]) -> bytes:
    """One server message as a complete text frame: encoded once (by orjson, see
    :func:`protocol.encode_frame`) however many members it goes to."""
    return text_frame(protocol.encode_frame(message))


def text_frame(payload: bytes) -> bytes:
    """One complete, unmasked text frame of UTF-8 ``payload``, valid on any server
    connection. (Built here: wsproto's framer took 7.5 µs for what this does in about 1.)"""
    return _frame(0x81, payload, None)


def pong_frame(payload: bytes) -> bytes:
    """The answer to a ping with ``payload`` (at most 125 bytes; wsproto checked)."""
    return _frame(0x8A, payload, None)


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with a status code and a short reason (at most 123 bytes of UTF-8).
    Built directly: wsproto's framer takes only the codes it names, not the private-use
    4000-4999 ones (the server API's disconnects)."""
    payload = code.to_bytes(2, "big") + reason.encode()[:123]
    return bytes((0x88, len(payload))) + payload


#: A ping with no payload (the daemon's liveness probe to a quiet client).
PING_FRAME = b"\x89\x00"


def whole_control_frames(data: bytes) -> bool:
    """Whether ``data`` is exactly a run of complete, masked control frames (a pong, a ping,
    a close): wsproto reads them whole and then holds no partial frame, so the text fast
    path (:func:`complete_text_messages`) stays valid for the next read."""
    at, size = 0, len(data)
    while at < size:
        header = frame_header(data, at)
        if header is None or not data[at] & 0x08 or header[0] + header[1] > size:
            return False
        at = header[0] + header[1]
    return size > 0


def complete_text_messages(data: bytes) -> list[str] | None:
    """The messages in ``data`` if it is exactly a run of complete, final, masked text frames
    (no extension bits, a minimally encoded length under 64 KiB, valid UTF-8); else None."""
    messages = []
    at, size = 0, len(data)
    while at < size:
        header = frame_header(data, at)
        if header is None or header[1] >= 65_536 or header[0] + header[1] > size:
            return None
        payload = _plain_payload(data, at, header, 0x81, masked=True)
        if payload is None:
            return None
        try:
            messages.append(payload.decode("utf-8"))
        except UnicodeDecodeError:
            return None
        at = header[0] + header[1]
    return messages or None


def frame_header(data: bytes | bytearray, at: int) -> tuple[int, int, bool] | None:
    """The header of the frame that starts at ``at``: (where its payload starts, the payload's
    length, whether that length is minimally encoded), or None while ``data`` does not hold
    the whole header. A masked frame's key is the 4 bytes before its payload."""
    size = len(data)
    if size - at < 2:
        return None
    second = data[at + 1]
    length = second & 0x7F
    start = at + 2
    minimal = True
    if length == 126:
        if size - start < 2:
            return None
        length = int.from_bytes(data[start : start + 2], "big")
        minimal = length >= 126
        start += 2
    elif length == 127:
        if size - start < 8:
            return None
        length = int.from_bytes(data[start : start + 8], "big")
        minimal = 65_536 <= length < 1 << 63
        start += 8
    if second & 0x80:
        start += 4
    return (start, length, minimal) if start <= size else None


def binary_payload(
    data: bytes | bytearray, at: int, header: tuple[int, int, bool], masked: bool
) -> bytes | None:
    """The payload of the whole frame at ``at`` (``header`` from :func:`frame_header`) if it is
    a final binary frame with no extension bits, a minimal length and a mask exactly when
    ``masked``; else None (wsproto must read it)."""
    return _plain_payload(data, at, header, 0x82, masked)


def _plain_payload(
    data: bytes | bytearray, at: int, header: tuple[int, int, bool], first: int, masked: bool
) -> bytes | None:
    """The payload of the whole frame at ``at`` if its first byte is ``first`` (FIN, no
    extension bits, the opcode), its length minimal and its mask there exactly when
    ``masked``; else None."""
    start, length, minimal = header
    if data[at] != first or not minimal or bool(data[at + 1] & 0x80) != masked:
        return None
    payload = data[start : start + length]
    if masked:
        return unmask(payload, data[start - 4 : start])
    return bytes(payload)


def binary_frame(payload: bytes, mask: bytes | None = None) -> bytes:
    """One complete, final binary frame, masked with the 4-byte ``mask`` if given (a client's
    frames must be)."""
    return _frame(0x82, payload, mask)


def _frame(first: int, payload: bytes, mask: bytes | None) -> bytes:
    """A final frame: ``first`` is its first byte (FIN and opcode), the length minimal."""
    size = len(payload)
    flag = 0 if mask is None else 0x80
    if size < 126:
        header = bytes((first, flag | size))
    elif size < 65_536:
        header = bytes((first, flag | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, flag | 127)) + size.to_bytes(8, "big")
    if mask is None:
        return header + payload
    return header + mask + unmask(payload, mask)


def unmask(payload: bytes | bytearray, key: bytes | bytearray) -> bytes:
    """``payload`` XORed with the repeated 4-byte ``key`` (masking and unmasking are the same).

    Small payloads (every cursor update) as one big-integer XOR: ~1.8 µs against ~4.8 for
    wsproto's table-driven masker, which wins from a few KB on."""
    size = len(payload)
    if size > 2048:
        return bytes(XorMaskerSimple(key).process(bytearray(payload)))
    keys = (bytes(key) * (size // 4 + 1))[:size]
    mixed = int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")
    return mixed.to_bytes(size, "big")


def joined(pieces: list[str | bytes]) -> str | bytes:
    """The pieces of one message (all text or all binary) as one."""
    if isinstance(pieces[0], bytes):
        return b"".join(p for p in pieces if isinstance(p, bytes))
    return "".join(p for p in pieces if isinstance(p, str))


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
