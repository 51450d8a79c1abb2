"""The frame guard (presenced.core.frame_guard) agrees with wsproto.

It reads any split of a stream into reads alike, refuses exactly the frame whose header puts
its message over the byte or frame limit, and leaves every frame wsproto refuses anyway to
wsproto. wsproto writes the client frames and reads what the guard let through.
"""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Ping, Request, TextMessage

from presenced.core.frame_guard import TOO_LARGE, TOO_MANY_FRAMES, FrameGuard


def connected() -> tuple[WSConnection, WSConnection]:
    """A (client, server) pair of wsproto connections past the handshake."""
    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="localhost", target="/")))
    assert any(isinstance(event, Request) for event in server.events())
    client.receive_data(server.send(AcceptConnection()))
    assert any(isinstance(event, AcceptConnection) for event in client.events())
    return client, server


def announced_length(data: bytes, at: int) -> int:
    """The payload length the whole frame header at ``data[at:]`` announces (RFC 6455 5.2)."""
    length = data[at + 1] & 0x7F
    extended = {126: 2, 127: 8}.get(length, 0)
    assert len(data) >= at + 2 + extended, "the header is not whole"
    if extended:
        return int.from_bytes(data[at + 2 : at + 2 + extended], "big")
    return length


def message_frames(client: WSConnection, pieces: list[bytes]) -> bytes:
    """One binary message made of one frame per piece."""
    return b"".join(
        client.send(BytesMessage(data=piece, message_finished=i == len(pieces) - 1))
        for i, piece in enumerate(pieces)
    )


@st.composite
def client_streams(draw: st.DrawFn) -> bytes:
    """Valid client frames: messages of 1-8 frames (of up to 300 bytes), and pings."""
    client, _ = connected()
    parts = st.one_of(
        st.lists(st.binary(max_size=300), min_size=1, max_size=8).map(
            lambda pieces: message_frames(client, pieces)
        ),
        st.binary(max_size=125).map(lambda data: client.send(Ping(payload=data))),
    )
    return b"".join(draw(st.lists(parts, min_size=1, max_size=6)))


def guard_verdict(data: bytes, cuts: list[int], max_bytes: int, max_frames: int) -> tuple:
    """(reason, where the refused frame's header starts, clipped to the start of the read that
    completes it) when ``data`` arrives in reads split at ``cuts``."""
    guard = FrameGuard(max_bytes, max_frames)
    bounds = [0, *sorted(cuts), len(data)]
    for start, end in itertools.pairwise(bounds):
        cut = guard.scan(data[start:end])
        if cut is not None:
            return guard.reason, start + cut, start
    return None, None, None


@given(client_streams(), st.lists(st.integers(min_value=0), max_size=20), st.data())
def test_the_guard_reads_any_split_of_a_stream_alike(
    data: bytes, cuts: list[int], draw: st.DataObject
) -> None:
    max_bytes = draw.draw(st.integers(min_value=1, max_value=1000))
    max_frames = draw.draw(st.integers(min_value=1, max_value=8))
    whole = guard_verdict(data, [], max_bytes, max_frames)
    split = guard_verdict(data, [c % (len(data) + 1) for c in cuts], max_bytes, max_frames)
    assert split[0] == whole[0]
    if whole[0] is not None:
        assert split[1] == max(whole[1], split[2])


@given(client_streams())
def test_the_guard_refuses_exactly_the_messages_over_the_limits(data: bytes) -> None:
    max_bytes, max_frames = 600, 4
    reason, at, _ = guard_verdict(data, [], max_bytes, max_frames)
    # What wsproto reads up to there: every message before it is within the limits.
    _, server = connected()
    server.receive_data(data if at is None else data[:at])
    frames = size = 0
    for event in server.events():
        if isinstance(event, BytesMessage):
            frames, size = frames + 1, size + len(event.data)
            assert frames <= max_frames and size <= max_bytes
            if event.message_finished:
                frames = size = 0
    if reason is not None:  # and the frame refused puts its message over one
        if reason == TOO_LARGE:
            assert size + announced_length(data, at) > max_bytes
        else:
            assert reason == TOO_MANY_FRAMES and frames + 1 > max_frames


def test_a_huge_header_is_refused_however_it_trickles_in() -> None:
    client, _ = connected()
    ping = client.send(Ping(payload=b"p"))
    huge = bytes([0x82, 0x80 | 127]) + (1 << 62).to_bytes(8, "big") + b"mask"
    data = ping + huge + b"\x00" * 100
    for size in (1, 2, 3, 7, len(data)):
        guard = FrameGuard(16_384, 64)
        verdicts = [guard.scan(data[i : i + size]) for i in range(0, len(data), size)]
        refused = [(i, cut) for i, cut in enumerate(verdicts) if cut is not None]
        assert guard.reason == TOO_LARGE
        # In the read that completes the length, at the header (or its start, if earlier).
        index, cut = refused[0]
        assert len(refused) == 1 and index == (len(ping) + 9) // size
        assert index * size + cut == max(len(ping), index * size)


def test_the_guard_leaves_what_wsproto_refuses_to_wsproto() -> None:
    huge = (1 << 62).to_bytes(8, "big")
    for data in (
        bytes([0x82, 127]) + huge,  # not masked: wsproto closes 1002
        bytes([0xC2, 0x80 | 127]) + huge,  # a reserved bit
        bytes([0x80, 0x80 | 127]) + huge,  # a continuation of no message
        bytes([0x83, 0x80 | 127]) + huge,  # a reserved opcode
        bytes([0x88, 0x80]) + b"mask" + bytes([0x82, 0x80 | 127]) + huge,  # after a close
    ):
        assert FrameGuard(16_384, 64).scan(data) is None


def test_the_guard_says_when_a_message_or_frame_is_unfinished() -> None:
    client, _ = connected()
    guard = FrameGuard(16_384, 64)
    first = client.send(TextMessage(data="ab", message_finished=False))
    ping = client.send(Ping(payload=b"p"))
    last = client.send(TextMessage(data="cd", message_finished=True))
    assert guard.scan(first) is None and guard.in_message
    assert guard.scan(ping) is None and guard.in_message  # a ping inside a message
    assert guard.scan(last[:3]) is None and guard.in_message  # half a frame
    assert guard.scan(last[3:]) is None and not guard.in_message
