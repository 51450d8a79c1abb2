"""The production peer transport: WebSocket over mutually authenticated TLS, on 127.0.0.1."""

from __future__ import annotations

import functools
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import attrs
import pytest
import trio
import trio_websocket
from wsproto.events import BytesMessage

from presenced.certs import CertError, init_ca, issue_node_cert
from presenced.server.peers import (
    ChannelClosed,
    PeerChannel,
    PeerManager,
    PeerTransport,
    tls_channel,
)
from presenced.server.peers.tls import SUBPROTOCOL, TlsWebSocketTransport
from presenced.server.peers.tls_contexts import client_context, server_context

LOGGER = "presenced.server.peers.tls"


@attrs.define
class Pki:
    root: Path

    def node(self, name: str, ca: str = "main") -> tuple[Path, Path, Path]:
        folder = self.root / ca
        return folder / f"{name}.pem", folder / f"{name}.key", folder / "ca.pem"

    def transport(
        self, name: str, *, ca: str = "main", trust: str = "main", **kwargs: object
    ) -> TlsWebSocketTransport:
        """The transport of node ``name`` with a cert from CA ``ca``, trusting CA ``trust``."""
        cert, key, _ = self.node(name, ca)
        trusted = self.root / trust / "ca.pem"
        kwargs.setdefault("listen_host", "127.0.0.1")
        kwargs.setdefault("listen_port", 0)
        kwargs.setdefault("handshake_timeout_s", 5.0)
        return TlsWebSocketTransport(
            server_ctx=server_context(cert, key, trusted),
            client_ctx=client_context(cert, key, trusted),
            **kwargs,  # type: ignore[arg-type]
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    init_ca(root / "main", name="main CA")
    for node in ("eu", "us"):
        issue_node_cert(root / "main", node, hosts=("localhost", "127.0.0.1"))
    issue_node_cert(root / "main", "nameonly", hosts=("localhost",))  # no 127.0.0.1 SAN
    # Another CA whose certificates claim the same node names.
    init_ca(root / "evil", name="evil CA")
    for node in ("eu", "us"):
        issue_node_cert(root / "evil", node, hosts=("localhost", "127.0.0.1"))
    return Pki(root)


@attrs.define
class Server:
    port: int
    channels: trio.MemoryReceiveChannel[PeerChannel]

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/peer"


@asynccontextmanager
async def serving(
    transport: TlsWebSocketTransport,
    on_channel: Callable[[PeerChannel], object] | None = None,
) -> AsyncIterator[Server]:
    """Run ``transport.serve``; each accepted channel is handed to the test, which drives it
    (the handler keeps it open until the channel is closed)."""
    send, receive = trio.open_memory_channel[PeerChannel](10)

    async def handler(channel: PeerChannel) -> None:
        closed = trio.Event()
        original_aclose = channel.aclose

        async def aclose() -> None:
            await original_aclose()
            closed.set()

        channel.aclose = aclose  # type: ignore[method-assign]
        await send.send(channel)
        await closed.wait()

    async with trio.open_nursery() as nursery:
        port = await nursery.start(transport.serve, handler)
        assert transport.bound_port == port
        yield Server(port, receive)
        nursery.cancel_scope.cancel()


async def test_is_a_peer_transport(pki: Pki) -> None:
    transport: PeerTransport = pki.transport("eu")
    assert transport is not None


async def test_messages_both_ways_with_proven_names(pki: Pki) -> None:
    us, eu = pki.transport("us"), pki.transport("eu")
    with trio.fail_after(10):
        async with serving(us) as server, eu.running():
            dialled = await eu.dial(server.url)
            accepted = await server.channels.receive()

            assert dialled.remote_names is not None and "us" in dialled.remote_names
            assert accepted.remote_names is not None and "eu" in accepted.remote_names
            assert dialled.remote_label == f"127.0.0.1:{server.port}"
            assert accepted.remote_label.startswith("127.0.0.1:")

            await dialled.send(b"\x00hello from eu")
            assert await accepted.receive() == b"\x00hello from eu"
            # A big message needs the other side reading (no task drains a channel for it).
            async with trio.open_nursery() as nursery:
                nursery.start_soon(accepted.send, b"hi from us")
                assert await dialled.receive() == b"hi from us"
                nursery.start_soon(accepted.send, bytes(range(256)) * 1000)
                assert await dialled.receive() == bytes(range(256)) * 1000

            # A closing side waits for the peer's close reply, which comes from the peer's
            # reader (channels have no task of their own): close while the other side reads.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dialled.aclose)
                with pytest.raises(ChannelClosed, match="code 1000"):
                    await accepted.receive()
            with pytest.raises(ChannelClosed):
                await dialled.send(b"after close")
            await dialled.aclose()  # idempotent


async def test_server_closing_ends_the_dialled_channel(pki: Pki) -> None:
    us, eu = pki.transport("us"), pki.transport("eu")
    with trio.fail_after(10):
        async with serving(us) as server, eu.running():
            dialled = await eu.dial(server.url)
            accepted = await server.channels.receive()
            await accepted.send(b"last words")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(accepted.aclose)
                assert await dialled.receive() == b"last words"
                with pytest.raises(ChannelClosed):
                    await dialled.receive()


async def test_client_from_another_ca_is_refused(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    us, eu = pki.transport("us"), pki.transport("eu")
    mallory = pki.transport("eu", ca="evil", trust="main")  # trusts us, but us won't trust it
    with trio.fail_after(4):  # well under the handshake timeout: refusal must be prompt
        async with serving(us) as server, mallory.running(), eu.running():
            with pytest.raises(ChannelClosed, match="cannot connect"):
                await mallory.dial(server.url)
            # The listener survived and still takes good peers.
            good = await eu.dial(server.url)
            accepted = await server.channels.receive()
            assert accepted.remote_names is not None and "eu" in accepted.remote_names
            await good.send(b"ok")
            assert await accepted.receive() == b"ok"
    refusals = [r for r in caplog.records if "refused peer connection from 127.0.0.1:" in r.message]
    assert len(refusals) == 1
    assert refusals[0].levelno == logging.WARNING
    assert "\n" not in refusals[0].getMessage()


async def test_client_without_certificate_is_refused(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    _, _, ca = pki.node("us")
    anonymous_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    anonymous = TlsWebSocketTransport(client_ctx=anonymous_ctx, handshake_timeout_s=5.0)
    with trio.fail_after(4):
        async with serving(pki.transport("us")) as server, anonymous.running():
            with pytest.raises(ChannelClosed):
                await anonymous.dial(server.url)
    assert any("refused peer connection" in r.message for r in caplog.records)


async def test_server_from_another_ca_is_refused(pki: Pki) -> None:
    impostor = pki.transport("us", ca="evil", trust="main")
    eu = pki.transport("eu")
    with trio.fail_after(4):
        async with serving(impostor) as server, eu.running():
            with pytest.raises(ChannelClosed, match="certificate verify failed"):
                await eu.dial(server.url)


async def test_server_cert_must_name_the_dialled_host(pki: Pki) -> None:
    eu = pki.transport("eu")
    with trio.fail_after(4):
        async with serving(pki.transport("nameonly")) as server, eu.running():
            with pytest.raises(ChannelClosed, match="certificate verify failed"):
                await eu.dial(server.url)  # 127.0.0.1 is not in its SANs
            dialled = await eu.dial(f"wss://localhost:{server.port}/")
            assert dialled.remote_names == {"nameonly", "localhost"}


async def test_wrong_subprotocol_is_refused(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    other = pki.transport("eu", subprotocol="presenced-peer.v999")
    with trio.fail_after(4):
        async with serving(pki.transport("us")) as server, other.running():
            with pytest.raises(ChannelClosed, match="HTTP 400: expected subprotocol"):
                await other.dial(server.url)
    assert any("subprotocol" in r.message for r in caplog.records)


async def test_silent_connection_times_out_without_blocking_others(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    us = pki.transport("us", handshake_timeout_s=0.3)
    eu = pki.transport("eu")
    with trio.fail_after(5):
        async with serving(us) as server, eu.running():
            silent = await trio.open_tcp_stream("127.0.0.1", server.port)
            good = await eu.dial(server.url)
            accepted = await server.channels.receive()
            await good.send(b"still here")
            assert await accepted.receive() == b"still here"
            await trio.sleep(0.6)
            assert any("timed out" in r.message for r in caplog.records)
            await silent.aclose()


async def test_tls_then_hang_up_is_refused_promptly(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    cert, key, ca = pki.node("eu")
    with trio.fail_after(3):
        async with serving(pki.transport("us")) as server:
            tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
            tls = trio.SSLStream(tcp, client_context(cert, key, ca), server_hostname="127.0.0.1")
            await tls.do_handshake()
            await tls.aclose()  # no WebSocket upgrade
            while not any("refused" in r.message for r in caplog.records):
                await trio.sleep(0.01)
    assert any("WebSocket handshake" in r.message for r in caplog.records)


async def test_text_message_closes_the_channel(pki: Pki) -> None:
    cert, key, ca = pki.node("eu")
    with trio.fail_after(5):
        async with serving(pki.transport("us")) as server, trio.open_nursery() as nursery:
            tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
            tls = trio.SSLStream(tcp, client_context(cert, key, ca), server_hostname="127.0.0.1")
            try:
                ws = await trio_websocket.wrap_client_stream(
                    nursery, tls, "127.0.0.1", "/", subprotocols=[SUBPROTOCOL]
                )
                accepted = await server.channels.receive()
                await ws.send_message("not binary")
                with pytest.raises(ChannelClosed, match="text message"):
                    await accepted.receive()
            finally:
                await trio.aclose_forcefully(tls)


async def test_message_size_limit(pki: Pki) -> None:
    us = pki.transport("us", max_message_bytes=1024)
    eu = pki.transport("eu")
    with trio.fail_after(5):
        async with serving(us) as server, eu.running():
            dialled = await eu.dial(server.url)
            accepted = await server.channels.receive()
            with pytest.raises(ValueError, match="exceeds"):
                await accepted.send(b"x" * 1025)
            await accepted.send(b"x" * 1024)  # still usable
            assert await dialled.receive() == b"x" * 1024
            await dialled.send(b"y" * 2048)  # within eu's limit, over us's
            with pytest.raises(ChannelClosed):
                await accepted.receive()


async def poll_until(channel: PeerChannel) -> bytes:
    """receive_nowait until a message is there (the bytes are still on their way)."""
    while (message := channel.receive_nowait()) is None:
        await trio.sleep(0.005)
    return message


async def test_receive_nowait_reads_only_what_has_arrived(pki: Pki) -> None:
    """The gossip layer reads near peers once per tick without waiting: nothing arrived is
    None, a message split over many TLS records and reads comes out whole and in order, and
    the end of the channel raises ChannelClosed like ``receive``."""
    us, eu = pki.transport("us"), pki.transport("eu", close_timeout_s=0.2)
    big = bytes(range(256)) * 2000  # 512 KB: dozens of TLS records, several socket reads
    with trio.fail_after(10):
        async with serving(us) as server, eu.running():
            dialled = await eu.dial(server.url)
            accepted = await server.channels.receive()
            assert accepted.receive_nowait() is None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dialled.send, big)  # needs the reader below to drain it
                assert await poll_until(accepted) == big
            await dialled.send(b"one")
            await dialled.send(b"two")
            assert await poll_until(accepted) == b"one"
            assert await poll_until(accepted) == b"two"
            assert accepted.receive_nowait() is None
            await accepted.send(b"and back")  # blocking receive still works alongside
            assert await dialled.receive() == b"and back"
            await dialled.aclose()
            with pytest.raises(ChannelClosed, match="code 1000"):
                await poll_until(accepted)
            with pytest.raises(ChannelClosed):
                accepted.receive_nowait()


@pytest.mark.parametrize("read_bytes", [65_536, 100])
async def test_receive_nowait_finds_everything_that_arrived(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, read_bytes: int
) -> None:
    """A read is skipped when the kernel has nothing new; what is already in, left in the
    kernel (more TLS records) or decrypted in OpenSSL (a record larger than one read, here
    with 100-byte reads), still comes out of ``receive_nowait`` at once, to the last byte."""
    monkeypatch.setattr(tls_channel, "_RECEIVE_BYTES", read_bytes)
    us, eu = pki.transport("us"), pki.transport("eu")
    messages = [bytes([n]) * (300 + 50 * n) for n in range(20)]
    with trio.fail_after(10):
        async with serving(us) as server, eu.running():
            dialled = await eu.dial(server.url)
            accepted = await server.channels.receive()
            for message in messages:
                await dialled.send(message)
            await dialled.send(b"last")
            assert await poll_until(accepted) == messages[0]  # everything is in by now
            await trio.sleep(0.05)
            assert [accepted.receive_nowait() for _ in messages[1:]] == messages[1:]
            assert accepted.receive_nowait() == b"last"
            assert accepted.receive_nowait() is None


@attrs.define(eq=False)
class PacedLink:
    """What ``wait_for_batches`` reads of a paced link."""

    view: object  # (its batch_tick)
    channel: object


async def test_the_ticker_waits_on_the_sockets_of_missing_batches_only(pki: Pki) -> None:
    """``PeerManager.wait_for_batches`` blocks the thread on the sockets of the paced links
    whose batch of this tick is missing: it returns True as soon as one has input, False
    once the time is up (input on a link whose batch is in does not count), and False at
    once for a transport without a socket (the simulation)."""
    us, eu = pki.transport("us"), pki.transport("eu")
    with trio.fail_after(10):
        async with serving(us) as server, eu.running():
            dialled = await eu.dial(server.url)
            accepted = await server.channels.receive()
            tick = 7
            missing = PacedLink(view=SimpleNamespace(batch_tick=tick - 1), channel=accepted)
            arrived = PacedLink(view=SimpleNamespace(batch_tick=tick), channel=dialled)
            manager = SimpleNamespace(
                node=SimpleNamespace(tick_index=lambda: tick),
                paced={missing: None, arrived: None},
            )
            # (the two PeerManager methods at work, on a stand-in holding what they read)
            manager._missing_batches = functools.partial(PeerManager._missing_batches, manager)
            wait = functools.partial(PeerManager.wait_for_batches, manager)

            async def timed(timeout: float) -> tuple[bool, float]:
                await trio.sleep(0.02)  # (what was sent is in by then)
                started = time.monotonic()
                return wait(timeout), time.monotonic() - started

            came, waited = await timed(0.05)
            assert not came and waited >= 0.04
            await accepted.send(b"for the link whose batch is in")
            came, waited = await timed(0.05)
            assert not came and waited >= 0.04
            await dialled.send(b"the missing batch")
            came, waited = await timed(5)
            assert came and waited < 1
            assert accepted.receive_nowait() == b"the missing batch"

            no_socket = SimpleNamespace(input_fd=lambda: None)
            manager.paced = {
                PacedLink(view=SimpleNamespace(batch_tick=tick - 1), channel=no_socket): None
            }
            came, waited = await timed(5)
            assert not came and waited < 1


async def test_send_nowait_never_waits_and_keeps_order(pki: Pki) -> None:
    """The ticker sends with send_nowait: it returns at once, True while the socket takes
    everything; with nobody reading, the socket fills, it says False, and what it kept goes
    out, in order, with ``flush`` once the peer reads again."""
    us, eu = pki.transport("us"), pki.transport("eu")
    chunk = bytes(range(256)) * 256  # 64 KB
    with trio.fail_after(10):
        async with serving(us) as server, eu.running():
            dialled = await eu.dial(server.url)
            accepted = await server.channels.receive()
            assert dialled.send_nowait(b"first") is True
            assert await accepted.receive() == b"first"
            sent, taken = 0, True
            while taken:
                taken = dialled.send_nowait(chunk + sent.to_bytes(4, "big"))
                sent += 1
                assert sent < 10_000, "the socket never filled up"
            for _ in range(3):  # more while the socket is full: queued behind the rest
                assert dialled.send_nowait(chunk + sent.to_bytes(4, "big")) is False
                sent += 1
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dialled.flush)
                for number in range(sent):
                    assert await accepted.receive() == chunk + number.to_bytes(4, "big")
            assert dialled.send_nowait(b"last") is True
            assert await accepted.receive() == b"last"


async def test_close_without_a_reader_on_the_other_side_gives_up_after_close_timeout(
    pki: Pki,
) -> None:
    us, eu = pki.transport("us"), pki.transport("eu", close_timeout_s=0.3)
    with trio.fail_after(5):
        async with serving(us) as server, eu.running():
            dialled = await eu.dial(server.url)
            accepted = await server.channels.receive()
            started = trio.current_time()
            await dialled.aclose()  # nobody reads on the other side: no close reply comes
            assert 0.25 < trio.current_time() - started < 2
            with pytest.raises(ChannelClosed):
                await accepted.receive()


async def test_leaving_running_closes_dialled_channels(pki: Pki) -> None:
    eu = pki.transport("eu")
    with trio.fail_after(5):
        async with serving(pki.transport("us")) as server:
            async with eu.running():
                await eu.dial(server.url)
                accepted = await server.channels.receive()
            with pytest.raises(ChannelClosed):
                await accepted.receive()


async def test_closed_dialled_channels_are_forgotten(pki: Pki) -> None:
    """A daemon redials for days: the transport must not keep every closed channel."""
    eu = pki.transport("eu", close_timeout_s=0.2)
    with trio.fail_after(10):
        async with serving(pki.transport("us")) as server, eu.running():
            for _ in range(3):
                dialled = await eu.dial(server.url)
                await server.channels.receive()
                await dialled.aclose()
            kept = await eu.dial(server.url)
            assert eu._dialled is not None and list(eu._dialled) == [kept]


async def test_plain_mode(caplog: pytest.LogCaptureFixture) -> None:
    plain_server = TlsWebSocketTransport(listen_host="127.0.0.1", allow_plain=True)
    plain_client = TlsWebSocketTransport(allow_plain=True)
    with trio.fail_after(5):
        async with serving(plain_server) as server, plain_client.running():
            dialled = await plain_client.dial(f"ws://127.0.0.1:{server.port}")
            accepted = await server.channels.receive()
            assert dialled.remote_names is None and accepted.remote_names is None
            await dialled.send(b"plain")
            assert await accepted.receive() == b"plain"


@pytest.mark.parametrize("plain", [True, False], ids=["ws", "wss"])
async def test_messages_before_the_close_are_all_received(pki: Pki, plain: bool) -> None:
    """A peer's last messages (its removals and its bye, at shutdown) may arrive in the same
    read as its close frame: each is handed out before ChannelClosed."""
    if plain:
        server_side = TlsWebSocketTransport(listen_host="127.0.0.1", allow_plain=True)
        client_side = TlsWebSocketTransport(allow_plain=True, close_timeout_s=0.2)
    else:
        server_side = pki.transport("us")
        client_side = pki.transport("eu", close_timeout_s=0.2)
    scheme = "ws" if plain else "wss"
    with trio.fail_after(5):
        async with serving(server_side) as server, client_side.running():
            dialled = await client_side.dial(f"{scheme}://127.0.0.1:{server.port}/")
            accepted = await server.channels.receive()
            for message in (b"removals", b"bye"):
                await dialled.send(message)
            await dialled.aclose()  # nobody reads yet: all of it waits in one socket buffer
            assert await accepted.receive() == b"removals"
            assert accepted.receive_nowait() == b"bye"
            with pytest.raises(ChannelClosed, match="code 1000"):
                await accepted.receive()


async def test_a_cancelled_close_still_closes_the_socket(pki: Pki) -> None:
    """The gossip layer gives a close one second; a peer that never answers must not leave
    the socket open (nor the channel in the transport's list) until shutdown."""
    eu = pki.transport("eu", close_timeout_s=5)
    with trio.fail_after(5):
        async with serving(pki.transport("us")) as server, eu.running():
            dialled = await eu.dial(server.url)
            await server.channels.receive()  # (nobody reads there: no close reply comes)
            with trio.move_on_after(0.2):
                await dialled.aclose()
            assert eu._dialled == {}
            assert dialled._sock.closed  # type: ignore[attr-defined]


async def test_dial_misuse(pki: Pki) -> None:
    eu = pki.transport("eu")
    with pytest.raises(RuntimeError, match="running"):
        await eu.dial("wss://127.0.0.1:1/")
    async with eu.running():
        with pytest.raises(ValueError, match="allow_plain"):
            await eu.dial("ws://127.0.0.1:1/")
        for url in ("https://127.0.0.1:1/", "wss://127.0.0.1/", "wss://:5/", "nonsense"):
            with pytest.raises(ValueError, match="bad peer URL"):
                await eu.dial(url)
        with pytest.raises(OSError):
            await eu.dial(f"wss://127.0.0.1:{await _closed_port()}/")
    with pytest.raises(ValueError):
        TlsWebSocketTransport()


async def _closed_port() -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = int(listeners[0].socket.getsockname()[1])
    await listeners[0].aclose()
    return port


def test_context_errors(pki: Pki, tmp_path: Path) -> None:
    cert, key, ca = pki.node("eu")
    with pytest.raises(CertError, match="not found"):
        server_context(tmp_path / "missing.pem", key, ca)
    with pytest.raises(CertError, match="not found"):
        client_context(cert, key, tmp_path / "missing-ca.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(CertError, match="cannot load CA"):
        client_context(cert, key, garbage)
    with pytest.raises(CertError, match="cannot load certificate"):
        server_context(garbage, key, ca)
    _, other_key, _ = pki.node("us")
    with pytest.raises(CertError, match="cannot load certificate") as info:
        server_context(cert, other_key, ca)
    assert "\n" not in str(info.value)


def test_contexts(pki: Pki) -> None:
    cert, key, ca = pki.node("eu")
    server = server_context(cert, key, ca)
    client = client_context(cert, key, ca)
    for ctx in (server, client):
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
        assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "main CA"),),)]
    assert client.check_hostname


async def test_handler_letting_channel_closed_escape_is_fine(pki: Pki) -> None:
    us, eu = pki.transport("us"), pki.transport("eu")
    accepted: list[PeerChannel] = []

    async def echo(channel: PeerChannel) -> None:
        accepted.append(channel)
        while True:  # ends with ChannelClosed, which serve() swallows
            await channel.send(await channel.receive())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery, eu.running():
            port = await nursery.start(us.serve, echo)
            for _ in range(2):
                channel = await eu.dial(f"wss://127.0.0.1:{port}")
                await channel.send(b"ping")
                assert await channel.receive() == b"ping"
                await channel.aclose()
            nursery.cancel_scope.cancel()
    assert len(accepted) == 2


async def test_dial_times_out_on_a_silent_server(pki: Pki) -> None:
    eu = pki.transport("eu", handshake_timeout_s=0.3)
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    with trio.fail_after(3):
        async with trio.open_nursery() as nursery, eu.running():
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, hold, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises(ChannelClosed, match="timed out"):
                await eu.dial(f"wss://127.0.0.1:{port}/")
            nursery.cancel_scope.cancel()


async def test_dial_times_out_when_the_upgrade_is_not_answered(pki: Pki) -> None:
    eu = pki.transport("eu", handshake_timeout_s=0.3)
    cert, key, ca = pki.node("us")
    ctx = server_context(cert, key, ca)

    async def tls_then_silence(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, ctx, server_side=True)
        await tls.do_handshake()
        await tls.receive_some()  # the HTTP upgrade request, never answered
        await trio.sleep_forever()

    with trio.fail_after(3):
        async with trio.open_nursery() as nursery, eu.running():
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, tls_then_silence, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises(ChannelClosed, match="timed out"):
                await eu.dial(f"wss://127.0.0.1:{port}/")
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("plain", [True, False], ids=["ws", "wss"])
async def test_frames_that_are_not_plain_binary_still_go_through_wsproto(
    pki: Pki, plain: bool
) -> None:
    """Plain binary frames skip wsproto, both ways and at every length encoding; a fragmented
    message between them is still put back together, in order, and a plain frame inside a
    fragmented message breaks the protocol."""
    if plain:
        us = TlsWebSocketTransport(listen_host="127.0.0.1", allow_plain=True)
        eu = TlsWebSocketTransport(allow_plain=True)
    else:
        us, eu = pki.transport("us"), pki.transport("eu")
    sizes = [0, 1, 125, 126, 65_535, 65_536, 200_000]
    with trio.fail_after(10):
        async with serving(us) as server, eu.running():
            dialled = await eu.dial(f"{'ws' if plain else 'wss'}://127.0.0.1:{server.port}/")
            accepted = await server.channels.receive()
            async with trio.open_nursery() as nursery:
                for size in sizes:
                    nursery.start_soon(dialled.send, bytes([size % 251]) * size)
                    assert await accepted.receive() == bytes([size % 251]) * size
                    nursery.start_soon(accepted.send, bytes([size % 13]) * size)
                    assert await dialled.receive() == bytes([size % 13]) * size
            ws = dialled._ws  # (white box: frames the public API never sends)
            dialled._out += ws.send(BytesMessage(data=b"frag", message_finished=False))
            dialled._out += ws.send(BytesMessage(data=b"mented", message_finished=True))
            await dialled.send(b"after")
            assert await accepted.receive() == b"fragmented"
            assert await accepted.receive() == b"after"
            dialled._out += ws.send(BytesMessage(data=b"open", message_finished=False))
            await dialled.send(b"plain frame inside a fragmented message")
            with pytest.raises(ChannelClosed, match="1002"):
                await accepted.receive()
