"""The framing fast paths agree with wsproto.

Client text frames: whatever :func:`complete_text_messages` accepts, wsproto reads the same
way; what wsproto would treat otherwise (control frames, fragments, partial frames, bad
headers, invalid UTF-8), it refuses, and the connection hands the bytes to wsproto.

Peer binary frames: :func:`frame_header` finds where every frame wsproto writes ends,
:func:`binary_payload` reads exactly the final binary frames (and refuses every other kind),
and wsproto reads what :func:`binary_frame` writes.

(The frame guard that runs before wsproto is tested in tests/test_frame_guard.py.)"""

from __future__ import annotations

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
