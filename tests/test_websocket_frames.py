"""The framing fast paths agree with wsproto.

Client text frames: whatever :func:`complete_text_messages` accepts, wsproto reads the same
way; what wsproto would treat otherwise (control frames, fragments, partial frames, bad
headers, invalid UTF-8), it refuses, and the connection hands the bytes to wsproto.

Peer binary frames: :func:`frame_header` finds where every frame wsproto writes ends,
:func:`binary_payload` reads exactly the final binary frames (and refuses every other kind),
and wsproto reads what :func:`binary_frame` writes.

The frame guard: it reads any split of a stream into reads alike, and refuses exactly the
frame whose header puts its message over the byte or frame limit."""

from __future__ import annotations

import itertools
import os

from hypothesis import given
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    Event,
    Ping,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import XorMaskerSimple

from presenced.core.frame_guard import TOO_LARGE, TOO_MANY_FRAMES, FrameGuard
from presenced.core.ws_frames import (
    binary_frame,
    binary_payload,
    complete_text_messages,
    frame_header,
    text_frame,
)


def connected() -> tuple[WSConnection, WSConnection]:
    """A (client, server) pair of wsproto connections past the handshake."""
    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="localhost", target="/")))
    assert any(isinstance(event, Request) for event in server.events())
    client.receive_data(server.send(AcceptConnection()))
    assert any(isinstance(event, AcceptConnection) for event in client.events())
    return client, server


def masked_text_frame(payload: bytes) -> bytes:
    """A final, masked text frame around any payload (valid UTF-8 or not)."""
    key = os.urandom(4)
    masked = bytes(XorMaskerSimple(key).process(bytearray(payload)))
    if len(payload) < 126:
        header = bytes([0x81, 0x80 | len(payload)])
    else:
        header = bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big")
    return header + key + masked


def pieces(client: WSConnection) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.text(max_size=300).map(lambda text: client.send(TextMessage(data=text))),
        st.binary(max_size=50).map(lambda data: client.send(BytesMessage(data=data))),
        st.binary(max_size=20).map(lambda data: client.send(Ping(payload=data))),
        st.text(min_size=1, max_size=20).map(
            lambda text: (
                client.send(TextMessage(data=text, message_finished=False))
                + client.send(TextMessage(data=text, message_finished=True))
            )
        ),
        st.sampled_from([b"\xff\xfe", b"\xc3", b"\xed\xa0\x80"]).map(masked_text_frame),
        st.binary(min_size=1, max_size=12),  # garbage
    )


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    client, _ = connected()
    data = b"".join(draw(st.lists(pieces(client), min_size=1, max_size=6)))
    cut = draw(st.integers(min_value=0, max_value=len(data)))
    return data[:cut] if draw(st.booleans()) else data


def text_events(server: WSConnection, data: bytes) -> list[Event]:
    server.receive_data(data)
    return list(server.events())


@given(streams())
def test_whatever_the_fast_path_accepts_wsproto_reads_the_same(data: bytes) -> None:
    messages = complete_text_messages(data)
    if messages is None:
        return
    _, server = connected()
    events = text_events(server, data)
    assert all(isinstance(e, TextMessage) and e.message_finished for e in events), events
    assert [e.data for e in events if isinstance(e, TextMessage)] == messages


@given(st.lists(st.text(max_size=2000), min_size=1, max_size=8))
def test_whole_text_frames_take_the_fast_path(texts: list[str]) -> None:
    client, server = connected()
    data = b"".join(client.send(TextMessage(data=text)) for text in texts)
    assert complete_text_messages(data) == texts
    assert [e.data for e in text_events(server, data) if isinstance(e, TextMessage)] == texts


def test_what_it_refuses() -> None:
    client, _ = connected()
    frame = client.send(TextMessage(data="hello"))
    assert complete_text_messages(b"") is None
    assert complete_text_messages(frame[:-1]) is None  # partial
    assert complete_text_messages(frame + frame[:3]) is None  # a whole frame, then a partial
    assert complete_text_messages(client.send(Ping(payload=b"x"))) is None
    assert complete_text_messages(client.send(BytesMessage(data=b"x"))) is None
    assert complete_text_messages(masked_text_frame(b"\xff")) is None  # not UTF-8
    unmasked = bytes([0x81, 5]) + b"hello"
    assert complete_text_messages(unmasked) is None
    long_form = bytes([0x81, 0x80 | 126, 0, 5]) + frame[2:]  # 16-bit length for 5 bytes
    assert complete_text_messages(long_form) is None
    big = client.send(TextMessage(data="x" * 70_000))  # 64-bit length
    assert complete_text_messages(big) is None


def frames(sender: WSConnection) -> st.SearchStrategy[bytes]:
    """Any one frame (or, for fragments, a run of frames) ``sender`` may write."""
    sizes = st.sampled_from([0, 1, 125, 126, 127, 65_535, 65_536, 70_000])
    return st.one_of(
        st.binary(max_size=300).map(lambda data: sender.send(BytesMessage(data=data))),
        sizes.map(lambda size: sender.send(BytesMessage(data=b"\x01" * size))),
        st.text(max_size=50).map(lambda text: sender.send(TextMessage(data=text))),
        st.binary(max_size=20).map(lambda data: sender.send(Ping(payload=data))),
        st.binary(min_size=1, max_size=20).map(
            lambda data: sender.send(BytesMessage(data=data, message_finished=False))
        ),
    )


@given(st.booleans(), st.data())
def test_frame_boundaries_and_plain_binary_payloads_agree_with_wsproto(
    from_client: bool, data: st.DataObject
) -> None:
    client, server = connected()
    sender, receiver = (client, server) if from_client else (server, client)
    frame = data.draw(frames(sender))
    header = frame_header(frame, 0)
    assert header is not None
    start, length, _ = header
    assert start + length == len(frame)  # where the frame ends
    for cut in range(min(start, 14)):  # a partial header is not read as one
        assert frame_header(frame[:cut], 0) is None
    payload = binary_payload(frame, 0, header, masked=from_client)
    receiver.receive_data(frame)
    events = list(receiver.events())
    plain = [e for e in events if isinstance(e, BytesMessage) and e.message_finished]
    if payload is not None:
        assert len(events) == 1 and len(plain) == 1 and plain[0].data == payload
    else:  # anything but a final binary frame: wsproto's to read
        assert not plain
    # A frame masked the wrong way round is never taken as plain.
    assert binary_payload(frame, 0, header, masked=not from_client) is None


@given(st.binary(max_size=70_000), st.booleans())
def test_wsproto_reads_what_binary_frame_writes(payload: bytes, masked: bool) -> None:
    client, server = connected()
    receiver = server if masked else client
    frame = binary_frame(payload, os.urandom(4) if masked else None)
    receiver.receive_data(frame)
    events = list(receiver.events())
    assert len(events) == 1 and isinstance(events[0], BytesMessage)
    assert events[0].data == payload and events[0].message_finished
    header = frame_header(frame, 0)
    assert header is not None and binary_payload(frame, 0, header, masked) == payload


def test_non_minimal_lengths_are_left_to_wsproto() -> None:
    """wsproto refuses a length encoded longer than it needs; so must the fast path."""
    sixteen = bytes([0x82, 126, 0, 5]) + b"hello"
    sixty_four = bytes([0x82, 127]) + (5).to_bytes(8, "big") + b"hello"
    for frame in (sixteen, sixty_four):
        header = frame_header(frame, 0)
        assert header is not None and header[1] == 5
        assert binary_payload(frame, 0, header, masked=False) is None


@given(st.one_of(st.text(max_size=300), st.sampled_from(["x" * 65_535, "é" * 40_000])))
def test_text_frame_is_what_wsproto_writes(text: str) -> None:
    _, server = connected()
    assert text_frame(text.encode("utf-8")) == server.send(TextMessage(data=text))


# ------------------------------------------------------------------------------ frame guard


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
        header = frame_header(data, at)
        assert header is not None
        if reason == TOO_LARGE:
            assert size + header[1] > max_bytes
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
