"""WebSocket framing that needs no connection state: close codes, whole frames out, and the
fast reads of whole frames in.

The client service does not use trio-websocket's connection object: that adds a reader task
and a channel hop per message (measured at ~100 µs of CPU per paced message on a 2-vCPU VM),
and the hot path is thousands of small frames per second. Each connection's own task feeds
bytes to wsproto's sans-I/O state machine instead (see :mod:`presenced.server.clients`), and
the common cases skip even that, through the functions here.

Server frames are unmasked and no extensions are negotiated, so one encoded frame is valid on
every connection: a room diff is encoded once and the same bytes are written to every member.

Client frames: what a client sends is almost always whole, small, final, masked text frames
(one JSON request each). :func:`complete_text_messages` reads exactly that case in a few
microseconds (wsproto takes ~32 µs of CPU per such frame here, the largest single cost of a
cursor update); anything else (a partial frame, a control frame, fragmentation, a bad header,
invalid UTF-8) returns None, and the connection hands that read, and every later one, to
wsproto, which either handles it or closes with the right code. So the fast path only ever
accepts what wsproto would accept, with the same result (a property test checks this).

Peer links carry one binary message per tick each way, and wsproto took 25-37 µs of CPU to
read one and 11-22 µs to frame one. So they split what they read into whole frames
(:func:`frame_header`), take a final binary frame's payload directly
(:func:`binary_payload`), and hand any other frame to wsproto whole; they frame what they send
with :func:`binary_frame`. wsproto still runs the handshake, control frames, fragments and
every protocol error, and since it is only ever given whole frames, it never holds part of
one, so the next plain frame may again skip it.
"""

from __future__ import annotations

import enum

from wsproto.frame_protocol import XorMaskerSimple


class CloseCode(enum.IntEnum):
    """The WebSocket close codes the daemon sends or acts on (RFC 6455, section 7.4.1).

    An IntEnum: a code read off the wire (a plain int) compares and hashes equal to its
    member, and it prints as its number (metrics labels, logs).
    """

    #: A clean end: the client means to go (its session leaves at once).
    NORMAL = 1000
    #: Going away: a shutdown, a silent connection, a session taken over by a resume.
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    #: A kind of message the endpoint does not take (text on a peer link: binary only).
    UNSUPPORTED_DATA = 1003
    #: A close frame without a code (never sent; reported by the receiving side).
    NO_STATUS = 1005
    #: Text that is not UTF-8.
    INVALID_DATA = 1007
    #: A policy violation: unauthorized, no hello, a message flood.
    POLICY = 1008
    #: A frame or message over the size limits.
    TOO_BIG = 1009
    #: An unexpected error in the daemon (this connection alone is closed).
    INTERNAL = 1011
    #: Try again later: a client too slow to read what it is sent.
    TRY_AGAIN_LATER = 1013
    #: The session's token expired (past the grace) and no ``refresh`` came: reconnect
    #: with a fresh token (the private range, like the server API's 4001 and 4002).
    TOKEN_EXPIRED = 4003


def text_frame(payload: bytes) -> bytes:
    """One complete, unmasked text frame of UTF-8 ``payload``, valid on any server
    connection. (Built here: wsproto's framer took 7.5 µs for what this does in about 1.)"""
    return _frame(0x81, payload, None)


def pong_frame(payload: bytes) -> bytes:
    """The answer to a ping with ``payload`` (at most 125 bytes; wsproto checked)."""
    return _frame(0x8A, payload, None)


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with a status code and a short reason (at most 123 bytes of UTF-8, cut
    at a character boundary). Built directly: wsproto's framer takes only the codes it names,
    not the private-use 4000-4999 ones (the server API's disconnects)."""
    text = reason.encode()[:123].decode("utf-8", "ignore").encode()
    payload = int(code).to_bytes(2, "big") + text
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
