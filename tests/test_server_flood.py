"""Floods and slow links, over real sockets, with a raw WebSocket client written from
docs/protocol.md and RFC 6455 (frames built by hand; wsproto only parses what the daemon says).

One client cannot stall the others: a ping flood or a message flood far over the rate limit is
closed with 1008 while a victim in a room keeps getting its updates. Slow links work: a frame
may arrive in any number of reads; what is bounded is the number of real frames a message is
split into and the bytes a header announces (1009, refused at the header).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio
from test_cli_process import daemon_process
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage
from wsproto.frame_protocol import XorMaskerSimple

from presenced.server.clients import ClientConnection

WAIT = 5
TEXT, BINARY, CONTINUATION, PING = 0x1, 0x2, 0x0, 0x9


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, length: int = -1) -> bytes:
    """One masked client frame. ``length`` overrides the length the header announces."""
    size = len(payload) if length < 0 else length
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        header = bytes([first, 0x80 | size])
    elif size < 65_536:
        header = bytes([first, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        header = bytes([first, 0x80 | 127]) + size.to_bytes(8, "big")
    key = os.urandom(4)
    return header + key + bytes(XorMaskerSimple(key).process(bytearray(payload)))


def text(message: dict[str, Any]) -> bytes:
    return client_frame(TEXT, json.dumps(message).encode())


class Raw:
    """One client connection on a plain TCP socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parser = WSConnection(ConnectionType.CLIENT)
        self.messages: list[dict[str, Any]] = []
        self.taken = 0  # messages next_message has returned
        self.close_code: int | None = None

    @classmethod
    async def open(cls, port: int, user: str | None = None, first: bytes = b"") -> Raw:
        """Connect and upgrade (sending ``first`` right behind the request), then say hello
        as ``user`` unless None."""
        raw = cls(await trio.open_tcp_stream("127.0.0.1", port))
        request = raw.parser.send(Request(host="127.0.0.1", target="/"))
        await raw.stream.send_all(request + first)
        with trio.fail_after(WAIT):
            while not any(isinstance(e, AcceptConnection) for e in await raw._read()):
                pass
        if user is not None:
            await raw.send({"type": "hello", "user": user, "ref": "hi"})
            assert (await raw.next_message())["type"] == "welcome"
        return raw

    async def send(self, message: dict[str, Any]) -> None:
        await self.stream.send_all(text(message))

    async def _read(self) -> list[Any]:
        try:
            data = await self.stream.receive_some(1 << 16)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.close_code = self.close_code or -1  # gone without a close frame
            return []
        self.parser.receive_data(data)
        events = list(self.parser.events())
        for event in events:
            if isinstance(event, TextMessage):
                self.messages.append(json.loads(event.data))
            elif isinstance(event, CloseConnection) and self.close_code is None:
                self.close_code = event.code
        return events

    async def next_message(self) -> dict[str, Any]:
        with trio.fail_after(WAIT):
            while len(self.messages) == self.taken:
                assert self.close_code is None, self.close_code
                await self._read()
        self.taken += 1
        return self.messages[self.taken - 1]

    async def closed(self) -> int | None:
        """Read until the daemon closes; its close code."""
        with trio.fail_after(WAIT):
            while self.close_code is None:
                await self._read()
        return self.close_code

    async def errors_then_close(self) -> tuple[list[str], int | None]:
        code = await self.closed()
        return [m["code"] for m in self.messages if m["type"] == "error"], code

    async def aclose(self) -> None:
        await self.stream.aclose()


class Room:
    """A victim in room ``r`` watching a mover update its ``x`` every 20 ms."""

    def __init__(self, victim: Raw, mover: Raw) -> None:
        self.victim, self.mover = victim, mover
        self.seen: list[int] = []

    async def watch(self) -> None:
        while self.victim.close_code is None:
            seen = len(self.victim.messages)
            await self.victim._read()
            for message in self.victim.messages[seen:]:
                if message["type"] == "diff":
                    self.seen += [e["meta"]["x"] for e in message["updates"].get("mover", [])]

    async def move(self) -> None:
        x = 0
        while True:
            await self.mover.send({"type": "update", "room": "r", "meta": {"x": x}})
            x += 1
            await trio.sleep(0.02)

    async def victim_keeps_receiving(self, updates: int = 3) -> None:
        target = len(self.seen) + updates
        with trio.fail_after(WAIT):
            while len(self.seen) < target:
                await trio.sleep(0.01)
        assert self.seen == sorted(set(self.seen)), "the victim's updates went back"
        assert self.victim.close_code is None
        assert [m for m in self.victim.messages if m["type"] == "error"] == []


@asynccontextmanager
async def room(port: int) -> AsyncIterator[Room]:
    victim, mover = await Raw.open(port, "victim"), await Raw.open(port, "mover")
    await victim.send({"type": "join", "room": "r", "ref": 1})
    await mover.send({"type": "join", "room": "r", "ref": 1, "meta": {"x": -1}})
    assert (await mover.next_message())["type"] == "state"
    state = Room(victim, mover)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(state.watch)
        nursery.start_soon(state.move)
        await state.victim_keeps_receiving(1)
        yield state
        await state.victim_keeps_receiving()
        nursery.cancel_scope.cancel()
    await victim.aclose()
    await mover.aclose()


async def send_ignoring_close(raw: Raw, data: bytes) -> None:
    """Send, unless the daemon has hung up on the way."""
    with suppress(trio.BrokenResourceError):
        await raw.stream.send_all(data)


# ------------------------------------------------------------------------------ floods


async def test_ping_flood_is_closed_and_the_victim_keeps_its_updates(start_daemon) -> None:
    server = await start_daemon()  # the default limits: 200 frames/s, bursts of 400
    port = server.daemon.client_port
    async with room(port) as state:
        flooder = await Raw.open(port, "flooder")
        # 20,000 pings, without reading a byte of what comes back until they are all sent.
        await send_ignoring_close(flooder, client_frame(PING, b"") * 20_000)
        errors, code = await flooder.errors_then_close()
        assert code == 1008
        assert errors == ["rate_limited"]
        await state.victim_keeps_receiving()
        await flooder.aclose()
    assert server.daemon.node.metrics.closes == {1008: 1}


async def test_message_flood_gets_the_documented_1008_close(start_daemon) -> None:
    # At the default limits (a token every 5 ms): 20 messages every 5 ms or so, about 20 times
    # the rate, is a flood, however many of them get through.
    server = await start_daemon()
    port = server.daemon.client_port
    async with room(port) as state:
        flooder = await Raw.open(port, "flooder")
        batch = text({"type": "ping"}) * 20

        async def flood() -> None:
            while flooder.close_code is None:
                await send_ignoring_close(flooder, batch)
                await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            errors, code = await flooder.errors_then_close()
        assert code == 1008
        assert errors == ["rate_limited"]  # once: it is not repeated within a second
        assert {m["type"] for m in flooder.messages} == {"welcome", "pong", "error"}
        await state.victim_keeps_receiving()
        await flooder.aclose()


# ------------------------------------------------------------------------------ slow links


def padded_ping(ref: str, frame_bytes: int) -> bytes:
    """A ping request whose one text frame is exactly ``frame_bytes`` long."""
    payload = json.dumps({"type": "ping", "ref": ref, "pad": ""}).encode()
    payload = payload[:-2] + b"x" * (frame_bytes - 8 - len(payload)) + payload[-2:]
    frame = client_frame(TEXT, payload)
    assert len(frame) == frame_bytes
    return frame


@pytest.mark.parametrize(("frame_bytes", "writes"), [(1448, 66), (3000, 100)])
async def test_a_frame_in_many_reads_is_accepted(
    start_daemon, frame_bytes: int, writes: int
) -> None:
    server = await start_daemon()
    metrics = server.daemon.node.metrics
    raw = await Raw.open(server.daemon.client_port, "slow")
    frame = padded_ping("slow", frame_bytes)
    cuts = [frame_bytes * i // writes for i in range(writes + 1)]
    for start, end in itertools.pairwise(cuts):
        read = metrics.bytes_in
        await raw.stream.send_all(frame[start:end])
        with trio.fail_after(WAIT):  # the daemon has read it: each write is a read of its own
            while metrics.bytes_in < read + end - start:
                await trio.sleep(0.001)
    pong = await raw.next_message()
    assert pong["type"] == "pong" and pong["ref"] == "slow", pong
    await raw.aclose()


def fragmented(payload: bytes, frames: int) -> bytes:
    """One text message split into ``frames`` real frames."""
    cuts = [len(payload) * i // frames for i in range(frames + 1)]
    return b"".join(
        client_frame(TEXT if i == 0 else CONTINUATION, payload[a:b], fin=i == frames - 1)
        for i, (a, b) in enumerate(itertools.pairwise(cuts))
    )


async def test_a_message_of_64_frames_is_accepted(start_daemon) -> None:
    server = await start_daemon()
    raw = await Raw.open(server.daemon.client_port, "frames")
    payload = json.dumps({"type": "ping", "ref": "frames", "pad": "x" * 200}).encode()
    await raw.stream.send_all(fragmented(payload, 64))
    pong = await raw.next_message()
    assert pong["type"] == "pong" and pong["ref"] == "frames"
    await raw.aclose()


async def test_a_message_of_65_frames_is_refused_1009(start_daemon) -> None:
    server = await start_daemon()
    raw = await Raw.open(server.daemon.client_port, "frames")
    payload = json.dumps({"type": "ping", "ref": "frames", "pad": "x" * 200}).encode()
    await send_ignoring_close(raw, fragmented(payload, 65))
    errors, code = await raw.errors_then_close()
    assert (errors, code) == (["too_large"], 1009)
    await raw.aclose()


@pytest.mark.parametrize("opcode", [TEXT, BINARY], ids=["text", "binary"])
async def test_a_header_announcing_2_to_the_62_bytes_is_closed_1009(
    start_daemon, opcode: int
) -> None:
    server = await start_daemon()
    raw = await Raw.open(server.daemon.client_port, "huge")
    # The header, then a little of the payload it announces (not UTF-8, for good measure).
    await send_ignoring_close(raw, client_frame(opcode, b"\xff" * 64, length=1 << 62))
    errors, code = await raw.errors_then_close()
    assert (errors, code) == (["too_large"], 1009)
    await raw.aclose()


async def test_frames_sent_behind_the_upgrade_request_are_read(start_daemon) -> None:
    server = await start_daemon(limits={"hello_timeout_s": 1.0})
    hello = text({"type": "hello", "user": "eager", "ref": 1})
    raw = await Raw.open(server.daemon.client_port, first=hello + client_frame(PING, b"x"))
    welcome = await raw.next_message()
    assert welcome["type"] == "welcome" and welcome["user"] == "eager"
    await raw.aclose()


@pytest.mark.slow
async def test_the_close_reaches_a_flooder_of_a_daemon_process(tmp_path: Path) -> None:
    """Closing a socket with unread input resets it, and the reset throws away what the
    client had not read yet (seen with the daemon in a process of its own): the daemon reads
    (and ignores) the rest first, so the flooder learns why it was closed."""
    async with daemon_process(tmp_path, "--allow-anonymous") as (_, port):
        for _ in range(3):
            flooder = await Raw.open(port, "flooder")
            await send_ignoring_close(flooder, client_frame(PING, b"") * 20_000)
            await trio.sleep(0.2)  # the daemon has closed it by now
            assert await flooder.errors_then_close() == (["rate_limited"], 1008)
            await flooder.aclose()


@pytest.mark.parametrize("paced", [False, True], ids=["reader-task", "paced-by-the-ticker"])
async def test_an_error_reading_one_connection_closes_it_alone(
    start_daemon, monkeypatch: pytest.MonkeyPatch, paced: bool
) -> None:
    """A bug met while reading one client's frames (in its own task, or in the ticker that
    reads paced clients) closes that connection with 1011; the others keep their updates."""
    handle_events = ClientConnection._handle_events

    def explode(self: ClientConnection, ws: Any) -> bool:
        if self.user == "bomb":
            raise RuntimeError("a bug")
        return handle_events(self, ws)

    server = await start_daemon()
    port = server.daemon.client_port
    async with room(port) as state:
        bomb = await Raw.open(port, "bomb")
        if paced:  # its updates make the ticker read it
            await bomb.send({"type": "join", "room": "r", "ref": 1})
            assert (await bomb.next_message())["type"] == "state"
            for x in range(3):
                await bomb.send({"type": "update", "room": "r", "meta": {"x": x}})
            with trio.fail_after(WAIT):
                while "bomb" not in {c.user for c in server.daemon.paced}:
                    await trio.sleep(0.001)
        monkeypatch.setattr(ClientConnection, "_handle_events", explode)
        await bomb.stream.send_all(client_frame(PING, b"boom"))  # wsproto's to read
        assert await bomb.closed() == 1011
        await state.victim_keeps_receiving()
        await bomb.aclose()
