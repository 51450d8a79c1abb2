"""Frame headers of a client's WebSocket byte stream, checked before wsproto reads them.

wsproto hands a frame's payload over in pieces as it arrives (one event per socket read) and
only checks what it must (masking, opcodes, UTF-8). What a client may make the daemon hold is
bounded here instead, from the headers alone, so a frame over the limits is refused as soon as
its header is read, before any of its payload is buffered, however it is split into reads:

* a message (the payloads of all its frames) may announce at most ``max_message_bytes``;
* a message may be split into at most ``max_frames`` frames (each frame costs a wsproto event
  and is held until the message is complete).

A frame wsproto will refuse anyway (reserved bits or opcodes, no mask, a fragmented or long
control frame, a stray continuation, a non-minimal length) stops the scan: wsproto closes the
connection at that frame with its own code, and nothing after it is ever read.
"""

from __future__ import annotations

#: Opcodes.
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
TOO_LARGE = "frame is too large"
TOO_MANY_FRAMES = "too many fragments"


class FrameGuard:
    """Follows frame boundaries across reads; see the module docstring."""

    __slots__ = (
        "_blind",
        "_frames",
        "_header",
        "_in_message",
        "_message_bytes",
        "_skip",
        "max_frames",
        "max_message_bytes",
        "reason",
    )

    def __init__(self, max_message_bytes: int, max_frames: int) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_frames = max_frames
        #: Why :meth:`scan` found a frame over the limits (TOO_LARGE or TOO_MANY_FRAMES).
        self.reason = ""
        self._header = b""  # the start of a header that continues in the next read
        self._skip = 0  # bytes of the current frame (mask and payload) still to come
        self._in_message = False
        self._frames = 0  # frames of the message in progress
        self._message_bytes = 0  # payload bytes its frames announced
        self._blind = False  # past a frame wsproto refuses: nothing more is read

    @property
    def in_message(self) -> bool:
        """Whether a message has begun and not ended (or the stream is past understanding):
        then only wsproto may read what comes next."""
        return self._in_message or self._blind or bool(self._header) or self._skip > 0

    def scan(self, data: bytes) -> int | None:
        """Where in ``data`` the header of the first frame over the limits starts (0 if it
        started in an earlier read); None while every frame is within them."""
        if self._blind or self.reason:
            return None
        at, size = 0, len(data)
        while at < size:
            if self._skip:
                step = min(self._skip, size - at)
                self._skip -= step
                at += step
                continue
            start = at - len(self._header)
            header = self._header + data[at : at + 10]
            parsed = _parse(header)
            if parsed is None:  # the header continues in the next read
                self._header = header
                return None
            used, length, first = parsed
            at += used - len(self._header)
            self._header = b""
            self._skip = 4 + length  # the mask, then the payload
            if not self._check(first, length):
                return max(start, 0) if self.reason else None
        return None

    def _check(self, first: int, length: int) -> bool:
        """Account for one frame; False to stop (over a limit, or wsproto will refuse it)."""
        opcode, fin = first & 0x0F, first & 0x80
        if first & 0x70 or length < 0:
            self._blind = True
        elif opcode in (PING, PONG):
            self._blind = not fin or length > 125
        elif opcode not in (CONTINUATION, TEXT, BINARY):
            self._blind = True  # a close (the end of what is read) or a reserved opcode
        elif (opcode == CONTINUATION) != self._in_message:
            self._blind = True  # a stray continuation, or a new message inside one
        else:
            if opcode == CONTINUATION:
                self._frames += 1
                self._message_bytes += length
            else:
                self._frames, self._message_bytes = 1, length
            if self._message_bytes > self.max_message_bytes:
                self.reason = TOO_LARGE
            elif self._frames > self.max_frames:
                self.reason = TOO_MANY_FRAMES
            self._in_message = not fin
        return not (self._blind or self.reason)


def _parse(header: bytes) -> tuple[int, int, int] | None:
    """(header bytes before the mask, payload length, first byte) of the frame whose header
    starts ``header``; None while that much is incomplete. The length is -1 for a frame
    wsproto refuses (no mask, or a length not minimally encoded), whose size does not matter."""
    if len(header) < 2:
        return None
    first, second = header[0], header[1]
    length = second & 0x7F
    used = 2
    if length == 126:
        if len(header) < 4:
            return None
        length = int.from_bytes(header[2:4], "big")
        used, minimal = 4, length >= 126
    elif length == 127:
        if len(header) < 10:
            return None
        length = int.from_bytes(header[2:10], "big")
        used, minimal = 10, 65_536 <= length < 1 << 63
    else:
        minimal = True
    if not second & 0x80 or not minimal:
        return used, -1, first
    return used, length, first
